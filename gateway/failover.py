"""The attempt loop: breaker gate, concurrency limit, send, classify, retry or fail over.

:func:`run` walks a request's routes in order and returns the first usable answer: a
:class:`~gateway.call.Reply` (a non-streaming body, or an upstream error the client must
see as is) or a :class:`~gateway.call.StreamStart` (an upstream stream that has produced
its first token and still holds its provider lease). When nothing answers it raises a
:class:`~gateway.errors.GatewayError` listing every attempt.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import replace

import aiohttp

from gateway import metrics
from gateway.call import AttemptRecord, Call, Reply, StreamStart
from gateway.errors import PHRASES, POLICY, Classified, GatewayError, Outcome, classify_exception
from gateway.routing import Route
from gateway.stream import hold, read_answer
from gateway.upstream import REUSED, Lease, Provider

log = logging.getLogger("gateway")

# Outcomes after which the request ends with the upstream's own answer.
_RETURNED_AS_IS = frozenset({Outcome.OK, Outcome.CLIENT_ERROR, Outcome.CONTENT_REFUSED})
# Answers kept as a Reply: those above, and context_too_long, shown if nothing better comes.
_KEPT = _RETURNED_AS_IS | {Outcome.CONTEXT_TOO_LONG}
_SKIPS = frozenset(
    {Outcome.BREAKER_OPEN, Outcome.PROVIDER_FULL, Outcome.UNSUPPORTED, Outcome.MODEL_MISSING}
)
# Attempts that say nothing about whether providers could serve the request.
_NOT_CANDIDATES = frozenset({Outcome.UNSUPPORTED, Outcome.MODEL_MISSING, Outcome.STALE_CONNECTION})
# How a request that no provider answered ends: status, type, code, message.
_ALL_BUSY = (429, "requests", "rate_limit_exceeded", "Every provider is rate limited or busy.")
_TOO_LATE = (
    504,
    "timeout",
    "request_timeout",
    "The request timed out before any provider answered.",
)
_ALL_FAILED = (503, "server_error", "all_providers_failed", "No provider could answer.")
# A POST on a pooled connection that the server had closed meanwhile fails at once, before
# any response byte; aiohttp does not resend it, so the loop does, once, visibly. A failure
# later than this on a pooled connection is the provider's (it read the request and hung up).
_STALE = Classified(Outcome.STALE_CONNECTION, "pooled connection closed by the server; resent")
_STALE_WITHIN = 1.0
_CLOSED_AGAIN = Classified(Outcome.UNREACHABLE, "server closed the connection again")


async def run(call: Call, routes: list[Route[Provider]]) -> Reply | StreamStart:
    """Try ``routes`` in order; return the first answer or raise :class:`GatewayError`."""
    if routes:
        call.first_route = routes[0].provider
    loop = asyncio.get_running_loop()
    previous: AttemptRecord | None = None
    kept_reply: Reply | None = None  # a context_too_long answer, shown if nothing better
    for route in routes:
        if loop.time() >= call.deadline:
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
        if previous.outcome is Outcome.DEADLINE:
            break
    if previous is not None and previous.outcome is not Outcome.DEADLINE:
        log.log(
            _level(previous),
            "%s %s, no provider left [%s]",
            previous.provider.display_name,
            PHRASES.get(previous.outcome, previous.outcome.value),
            call.request_id,
        )
    sent = {r.outcome for r in call.records} - _SKIPS - {Outcome.STALE_CONNECTION}
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


def _record(
    call: Call, provider: Provider, cls: Classified, wait: float = 0.0, cause: str = ""
) -> None:
    call.records.append(
        AttemptRecord(provider, cls.outcome, cls.detail, wait, cls.retry_after, cause)
    )
    metrics.UPSTREAM_ATTEMPTS.labels(provider.name, cls.outcome.value).inc()


def _skip_open(call: Call, provider: Provider, wait: float = 0.0) -> None:
    """Record a skip over an open breaker, with what opened it."""
    breaker = provider.breaker
    retry_in = breaker.retry_in()
    cause = breaker.cause
    why = f"{cause}; " if cause is not None else ""
    cls = Classified(Outcome.BREAKER_OPEN, f"{why}retry in {retry_in:.1f}s", None, retry_in)
    _record(call, provider, cls, wait, cause.kind if cause is not None else "")


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
        _skip_open(call, provider)
        return None
    lease = Lease(provider, permit)
    handed_over = False
    try:  # from here on, every path gives the permit back (a trial above all)
        if not await _take_slot(call, lease):
            return None
        # Encoded once: retries and a stale-connection resend send the same bytes.
        data = provider.dialect.request_body(call.body, call.raw, route.model)
        tries = 0
        wait = 0.0
        stale_resent = False
        while True:
            cls, answer = await _send(call, provider, data, lease)
            if cls is _STALE:
                if not stale_resent:
                    stale_resent = True
                    _record(call, provider, cls, wait)
                    continue
                cls = _CLOSED_AGAIN
            if cls.detail:  # an upstream's words: they may quote the key back
                cls = replace(cls, detail=provider.redact.text(cls.detail))
            if isinstance(answer, StreamStart):
                handed_over = True
            else:
                lease.judge(cls.outcome, _open_for(cls, provider), cls.detail)
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
            if permit is None:  # opened meanwhile, or another request is the half-open trial
                _skip_open(call, provider, delay)
                return None
            lease.permit = permit
            tries += 1
            wait = delay
    finally:
        if not handed_over:
            lease.finish(Outcome.CANCELLED)


async def _take_slot(call: Call, lease: Lease) -> bool:
    """A concurrency slot for ``lease``; False (recorded) when none came in time."""
    provider = lease.provider
    limiter = provider.limiter
    if not limiter.full():
        await limiter.acquire(0)
        lease.hold_slot()
        return True
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    remaining = call.deadline - loop.time()
    queue_wait = provider.config.max_queue_wait
    got = await limiter.acquire(min(queue_wait, remaining))
    waited = time.perf_counter() - start
    call.waited += waited
    metrics.QUEUE_WAIT.labels(provider.name).observe(waited)
    if got:
        lease.hold_slot()
    elif remaining < queue_wait and loop.time() >= call.deadline:
        _record(call, provider, Classified(Outcome.DEADLINE, "request deadline reached in queue"))
    else:
        _record(call, provider, Classified(Outcome.PROVIDER_FULL, "no free slot"))
    return got


def _open_for(cls: Classified, provider: Provider) -> float | None:
    """How long the upstream asked the breaker to stay open, beyond the usual rule."""
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
    own = cfg.first_token_timeout if call.stream else cfg.response_timeout
    limit = min(own, remaining)
    url = provider.dialect.url(cfg.base_url, call.endpoint)
    headers = {**provider.headers, "X-Request-Id": call.request_id}
    start = time.perf_counter()
    resp: aiohttp.ClientResponse | None = None
    handed_over = False
    REUSED.set(False)
    try:
        async with asyncio.timeout(limit):
            try:
                resp = await session.post(url, data=data, headers=headers, allow_redirects=False)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
                if isinstance(e, aiohttp.ClientConnectorError):
                    raise
                if REUSED.get() and time.perf_counter() - start < _STALE_WITHIN:
                    return _STALE, None
                raise
            if resp.status >= 300 or not call.stream:
                return await read_answer(provider, resp, _KEPT)
            cls, start_ = await hold(lease, resp, call.request_id)
            handed_over = start_ is not None
            return cls, start_
    except TimeoutError as e:
        if remaining <= own:  # the request's own deadline, not the provider's timeout
            return Classified(Outcome.DEADLINE, "request deadline reached"), None
        if resp is None and isinstance(e, aiohttp.ServerTimeoutError):
            return Classified(
                Outcome.TIMEOUT, f"connect timed out after {cfg.connect_timeout:g}s"
            ), None
        what = "first token" if call.stream else "response"
        return Classified(Outcome.TIMEOUT, f"no {what} within {limit:g}s"), None
    except (aiohttp.ClientError, OSError) as e:
        return classify_exception(e), None
    finally:
        call.waited += time.perf_counter() - start
        if resp is not None and not handed_over:
            resp.close()


def _busy(record: AttemptRecord) -> bool:
    """True for an attempt that says "later": rate limited, full, or open because of it."""
    return record.outcome in (Outcome.RATE_LIMITED, Outcome.PROVIDER_FULL) or (
        record.outcome is Outcome.BREAKER_OPEN and record.cause == Outcome.RATE_LIMITED.value
    )


def _give_up(call: Call, routes: list[Route[Provider]]) -> GatewayError:
    """The error for a request that no provider answered."""
    records = call.records
    outcomes = {r.outcome for r in records}
    attempts = "; ".join(r.describe() for r in records) or "no provider is configured"
    if records and outcomes == {Outcome.UNSUPPORTED}:
        return GatewayError(
            404,
            f"No provider serves /v1/{call.endpoint}. Attempts: {attempts}",
            code="unsupported_endpoint",
        )
    if records and outcomes <= {Outcome.MODEL_MISSING, Outcome.UNSUPPORTED}:
        return GatewayError(
            404,
            f"The model {call.model!r} is not available on any provider. Attempts: {attempts}",
            code="model_not_found",
        )
    hints = [p.breaker.retry_in() for p in {r.provider for r in routes}]
    hints += [r.retry_after for r in records if r.retry_after is not None]
    positive = [h for h in hints if h > 0]
    retry_after = max(1, math.ceil(min(positive))) if positive else 1
    candidates = [r for r in records if r.outcome not in _NOT_CANDIDATES]
    if Outcome.DEADLINE in outcomes:
        status, type_, code, why = _TOO_LATE
    elif candidates and all(_busy(r) for r in candidates):
        status, type_, code, why = _ALL_BUSY
    elif asyncio.get_running_loop().time() >= call.deadline:
        status, type_, code, why = _TOO_LATE
    else:
        status, type_, code, why = _ALL_FAILED
    message = f"{why} Attempts: {attempts}"
    return GatewayError(status, message, type_=type_, code=code, retry_after=retry_after)
