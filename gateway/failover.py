"""The attempt loop: breaker gate, concurrency limit, send, classify, retry or fail over.

:func:`run` walks a request's routes in order and returns the first usable answer: a
:class:`Reply` (a non-streaming body, or an upstream error the client must see as is) or
a :class:`StreamStart` (an upstream stream that has produced its first token and still
holds its provider lease). When nothing answers it raises a
:class:`~gateway.errors.GatewayError` listing every attempt.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDictProxy

from gateway import metrics
from gateway.errors import (
    PHRASES,
    POLICY,
    Classified,
    GatewayError,
    Outcome,
    classify_error_body,
    classify_exception,
    classify_response,
)
from gateway.providers.base import Lease, Provider
from gateway.routing import Route
from gateway.sse import DONE, Event, SSEError, SSEParser, has_output

log = logging.getLogger("gateway")

# Outcomes after which the request ends with the upstream's own answer.
_RETURNED_AS_IS = frozenset({Outcome.OK, Outcome.CLIENT_ERROR, Outcome.CONTENT_REFUSED})
# Answers kept as a Reply: those above, and context_too_long, shown if nothing better comes.
_KEPT = _RETURNED_AS_IS | {Outcome.CONTEXT_TOO_LONG}
_SKIPS = frozenset(
    {Outcome.BREAKER_OPEN, Outcome.PROVIDER_FULL, Outcome.UNSUPPORTED, Outcome.MODEL_MISSING}
)
# How a request that no provider answered ends: status, type, code, message.
_ALL_BUSY = (429, "requests", "rate_limit_exceeded", "Every provider is rate limited or busy.")
_TOO_LATE = (
    504,
    "timeout",
    "request_timeout",
    "The request timed out before any provider answered.",
)
_ALL_FAILED = (503, "server_error", "all_providers_failed", "No provider could answer.")
# A POST on a pooled connection that the server had already closed: aiohttp does not
# retry it, so the loop resends once without blaming the provider.
_STALE = Classified(Outcome.UNREACHABLE, "server closed a pooled connection")


@dataclass(slots=True)
class AttemptRecord:
    """One try on one provider, or one skip."""

    provider: Provider
    outcome: Outcome
    detail: str
    wait: float = 0.0  # backoff slept before this try
    retry_after: float | None = None

    def describe(self) -> str:
        """``LM Studio: unreachable (cannot connect: Connection refused)``."""
        waited = f" after {self.wait:.2f}s backoff" if self.wait else ""
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.provider.display_name}: {self.outcome.value}{detail}{waited}"


@dataclass(slots=True)
class Call:
    """One client request as the loop sees it, and what became of it."""

    endpoint: str  # "chat/completions", "completions" or "embeddings"
    body: dict[str, Any]
    raw: bytes
    model: str
    stream: bool
    request_id: str
    deadline: float  # event-loop time
    started: float = field(default_factory=time.perf_counter)
    waited: float = 0.0  # seconds spent waiting on upstreams, backoff and queues
    records: list[AttemptRecord] = field(default_factory=list)
    first_route: Provider | None = None
    # Filled in as the response goes out, for the completion log line and metrics.
    answered_by: Provider | None = None
    status: int = 0
    result: str = ""  # an Outcome value, or how the stream ended
    first_token_at: float | None = None  # perf_counter
    usage: dict[str, Any] | None = None

    @property
    def failover(self) -> bool:
        """True when the answer did not come from the first route."""
        return self.answered_by is not None and self.answered_by is not self.first_route


@dataclass(slots=True)
class Reply:
    """A complete upstream response to pass through."""

    provider: Provider
    outcome: Outcome
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    usage: dict[str, Any] | None = None


@dataclass(slots=True)
class StreamStart:
    """An upstream stream that has produced its first token; the relay takes it over."""

    provider: Provider
    lease: Lease
    resp: aiohttp.ClientResponse
    parser: SSEParser
    held: list[bytes]  # events up to and including the first token, as received
    backlog: list[Event]  # events that arrived in the same read after the first token


async def run(call: Call, routes: list[Route[Provider]]) -> Reply | StreamStart:
    """Try ``routes`` in order; return the first answer or raise :class:`GatewayError`."""
    if routes:
        call.first_route = routes[0].provider
    previous: AttemptRecord | None = None
    kept_reply: Reply | None = None  # a context_too_long answer, shown if nothing better
    for route in routes:
        if asyncio.get_running_loop().time() >= call.deadline:
            break
        if previous is not None:
            _log_failover(call, previous, route.provider)
        result = await _try_provider(call, route)
        if isinstance(result, StreamStart):
            return result
        if isinstance(result, Reply):
            if result.outcome is not Outcome.CONTEXT_TOO_LONG:
                return result
            kept_reply = result
        previous = call.records[-1]
    if previous is not None:
        log.log(
            _level(previous),
            "%s %s, no provider left [%s]",
            previous.provider.display_name,
            PHRASES.get(previous.outcome, previous.outcome.value),
            call.request_id,
        )
    sent = {r.outcome for r in call.records} - _SKIPS
    if kept_reply is not None and sent <= {Outcome.CONTEXT_TOO_LONG}:
        return kept_reply  # the upstream's own 400 says it best
    raise _give_up(call, routes)


def _log_failover(call: Call, previous: AttemptRecord, to: Provider) -> None:
    phrase = PHRASES.get(previous.outcome, previous.outcome.value)
    log.log(
        _level(previous),
        "%s %s, failing over to %s [%s]",
        previous.provider.display_name,
        phrase,
        to.display_name,
        call.request_id,
    )
    metrics.FAILOVERS.labels(previous.provider.name, to.name, previous.outcome.value).inc()


def _level(record: AttemptRecord) -> int:
    """A failure is a warning; a skip (an open breaker, a model not loaded) repeats for
    every request while it lasts, and the request line's chain already shows it."""
    return logging.DEBUG if record.outcome in _SKIPS else logging.WARNING


def _record(call: Call, provider: Provider, cls: Classified, wait: float = 0.0) -> None:
    call.records.append(AttemptRecord(provider, cls.outcome, cls.detail, wait, cls.retry_after))
    metrics.UPSTREAM_ATTEMPTS.labels(provider.name, cls.outcome.value).inc()


async def _try_provider(call: Call, route: Route[Provider]) -> Reply | StreamStart | None:
    """Every try on one provider; None when the loop should move on."""
    provider = route.provider
    cfg = provider.config
    loop = asyncio.get_running_loop()
    if call.endpoint not in provider.dialect.endpoints:
        _record(call, provider, Classified(Outcome.UNSUPPORTED, f"no /{call.endpoint}"))
        return None
    if provider.lacks_model(route.model):
        detail = f"model {route.model!r} is not loaded"
        _record(call, provider, Classified(Outcome.MODEL_MISSING, detail))
        return None
    permit = provider.breaker.try_acquire()
    if permit is None:
        retry_in = provider.breaker.retry_in()
        detail = f"retry in {retry_in:.1f}s"
        _record(call, provider, Classified(Outcome.BREAKER_OPEN, detail, None, retry_in))
        return None
    lease = Lease(provider, permit)
    if not await _take_slot(call, lease):
        provider.breaker.release(permit)
        _record(call, provider, Classified(Outcome.PROVIDER_FULL, "no free slot"))
        return None
    handed_over = False
    # Encoded once: retries and a stale-connection resend send the same bytes.
    data = provider.dialect.request_body(call.body, call.raw, route.model)
    try:
        tries = 0
        wait = 0.0
        stale_resent = False
        while True:
            cls, answer = await _send(call, provider, data, lease)
            if cls is _STALE and not stale_resent:
                stale_resent = True
                continue
            if isinstance(answer, StreamStart):
                handed_over = True
            else:
                lease.judge(cls.outcome, _open_for(cls, provider))
            _record(call, provider, cls, wait)
            if answer is not None:  # an answer, or an error the client must see (_KEPT)
                return answer
            if not POLICY[cls.outcome].retry_same or tries >= cfg.max_retries:
                return None
            delay = (
                cls.retry_after
                if cls.retry_after is not None
                else random.uniform(0, min(cfg.backoff_max, cfg.backoff_base * 2**tries))
            )
            if delay > cfg.max_retry_wait or loop.time() + delay >= call.deadline:
                return None  # the wait asked for is too long: fail over at once
            await asyncio.sleep(delay)
            call.waited += delay
            permit = provider.breaker.try_acquire()
            if permit is None:  # another request is the half-open trial
                retry_in = provider.breaker.retry_in()
                cls = Classified(Outcome.BREAKER_OPEN, f"retry in {retry_in:.1f}s", None, retry_in)
                _record(call, provider, cls, delay)
                return None
            lease.permit = permit
            tries += 1
            wait = delay
    finally:
        if not handed_over:
            lease.finish(Outcome.CANCELLED)


async def _take_slot(call: Call, lease: Lease) -> bool:
    provider = lease.provider
    limiter = provider.limiter
    if not limiter.full():
        await limiter.acquire(0)
        lease.hold_slot()
        return True
    start = time.perf_counter()
    remaining = call.deadline - asyncio.get_running_loop().time()
    got = await limiter.acquire(min(provider.config.max_queue_wait, remaining))
    waited = time.perf_counter() - start
    call.waited += waited
    metrics.QUEUE_WAIT.labels(provider.name).observe(waited)
    if got:
        lease.hold_slot()
    return got


def _open_for(cls: Classified, provider: Provider) -> float | None:
    """How long a failure should hold the breaker open, beyond the usual rule."""
    if cls.outcome is Outcome.QUOTA_EXHAUSTED:
        return provider.config.quota_reset_timeout
    if cls.outcome is Outcome.RATE_LIMITED and cls.retry_after:
        return cls.retry_after
    return None


async def _send(
    call: Call, provider: Provider, data: bytes, lease: Lease
) -> tuple[Classified, Reply | StreamStart | None]:
    """One request to one provider, up to a complete body or a stream's first token."""
    cfg = provider.config
    session = provider.session
    assert session is not None  # started by the app's cleanup context
    remaining = call.deadline - asyncio.get_running_loop().time()
    limit = min(cfg.first_token_timeout if call.stream else cfg.response_timeout, remaining)
    url = provider.dialect.url(cfg.base_url, call.endpoint)
    headers = {**provider.headers, "X-Request-Id": call.request_id}
    start = time.perf_counter()
    resp: aiohttp.ClientResponse | None = None
    handed_over = False
    try:
        async with asyncio.timeout(limit):
            try:
                resp = await session.post(url, data=data, headers=headers)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
                if isinstance(e, aiohttp.ClientConnectorError):
                    raise
                return _STALE, None
            if resp.status >= 300 or not call.stream:
                body = await resp.read()
                return _judge_body(provider, resp, body)
            cls, start_ = await _first_token(lease, resp)
            handed_over = start_ is not None
            return cls, start_
    except TimeoutError as e:
        what = "first token" if call.stream else "response"
        if remaining <= limit:
            return Classified(Outcome.TIMEOUT, "request deadline reached"), None
        if resp is None and isinstance(e, aiohttp.ServerTimeoutError):
            return Classified(
                Outcome.TIMEOUT, f"connect timed out after {cfg.connect_timeout:g}s"
            ), None
        return Classified(Outcome.TIMEOUT, f"no {what} within {limit:g}s"), None
    except (aiohttp.ClientError, OSError) as e:
        return classify_exception(e), None
    finally:
        call.waited += time.perf_counter() - start
        if resp is not None and not handed_over:
            resp.close()


def _judge_body(
    provider: Provider, resp: aiohttp.ClientResponse, body: bytes
) -> tuple[Classified, Reply | None]:
    """Classify a complete upstream response."""
    status = resp.status
    if status >= 300:
        cls = classify_response(status, body, resp.headers)
        keep = cls.outcome in _KEPT
        reply = Reply(provider, cls.outcome, status, resp.headers, body) if keep else None
        return cls, reply
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Classified(Outcome.BAD_RESPONSE, "response body is not JSON", status), None
    if not isinstance(parsed, dict):
        return Classified(Outcome.BAD_RESPONSE, "response body is not a JSON object", status), None
    if "error" in parsed:
        return classify_error_body(status, parsed), None
    usage = parsed.get("usage")
    reply = Reply(provider, Outcome.OK, status, resp.headers, body, usage)
    return Classified(Outcome.OK, "", status), reply


async def _first_token(
    lease: Lease, resp: aiohttp.ClientResponse
) -> tuple[Classified, StreamStart | None]:
    """Read a stream up to its first token without showing the client anything."""
    provider = lease.provider
    ctype = resp.headers.get("Content-Type", "")
    if "text/event-stream" not in ctype:
        body = await resp.read()
        cls, _ = _judge_body(provider, resp, body)
        if cls.outcome is Outcome.OK:
            cls = Classified(Outcome.BAD_RESPONSE, f"expected an event stream, got {ctype!r}")
        return cls, None
    parser = SSEParser(provider.max_event_bytes)
    held: list[bytes] = []
    content = resp.content
    while True:
        chunk = await content.readany()
        if not chunk:
            return Classified(Outcome.BAD_RESPONSE, "stream ended before the first token"), None
        try:
            events = parser.feed(chunk)
        except SSEError as e:
            return Classified(Outcome.BAD_RESPONSE, str(e)), None
        for i, event in enumerate(events):
            data = event.data
            if data is None:
                continue  # keep-alives before commit are not shown
            if data == DONE:
                return Classified(Outcome.BAD_RESPONSE, "stream ended before the first token"), None
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                return Classified(Outcome.BAD_RESPONSE, "malformed SSE event"), None
            if (isinstance(obj, dict) and "error" in obj) or event.name == "error":
                return classify_error_body(200, obj), None
            held.append(event.raw)
            if has_output(obj):
                start = StreamStart(provider, lease, resp, parser, held, events[i + 1 :])
                return Classified(Outcome.OK, "", resp.status), start


def _give_up(call: Call, routes: list[Route[Provider]]) -> GatewayError:
    """The error for a request that no provider answered."""
    outcomes = {r.outcome for r in call.records}
    attempts = "; ".join(r.describe() for r in call.records) or "no provider is configured"
    if call.records and outcomes <= {Outcome.MODEL_MISSING, Outcome.UNSUPPORTED}:
        return GatewayError(
            404,
            f"The model {call.model!r} is not available on any provider. Attempts: {attempts}",
            code="model_not_found",
        )
    hints = [p.breaker.retry_in() for p in {r.provider for r in routes}]
    hints += [r.retry_after for r in call.records if r.retry_after is not None]
    positive = [h for h in hints if h > 0]
    retry_after = max(1, math.ceil(min(positive))) if positive else 1
    if call.records and outcomes <= {Outcome.RATE_LIMITED, Outcome.PROVIDER_FULL}:
        status, type_, code, why = _ALL_BUSY
    elif asyncio.get_running_loop().time() >= call.deadline:
        status, type_, code, why = _TOO_LATE
    else:
        status, type_, code, why = _ALL_FAILED
    message = f"{why} Attempts: {attempts}"
    return GatewayError(status, message, type_=type_, code=code, retry_after=retry_after)
