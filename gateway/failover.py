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
from collections.abc import Sequence
from dataclasses import replace

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from breakers import STALLED_KIND, Cause
from gateway import budgets, hedge, metrics
from gateway.call import AttemptRecord, Call, Reply, StreamStart
from gateway.errors import (
    PHRASES,
    POLICY,
    Classified,
    GatewayError,
    Outcome,
    clamp_seconds,
    classify_exception,
    error_body,
    error_shape,
    request_fault,
)
from gateway.providers.base import BadRequest, Outgoing, Unsupported
from gateway.routing import Route
from gateway.stream import hold, read_answer
from gateway.upstream import REUSED, STALLED, Lease, Provider

log = logging.getLogger("gateway")

# Outcomes after which the request ends with the upstream's own answer.
_RETURNED_AS_IS = frozenset({Outcome.OK, Outcome.CLIENT_ERROR, Outcome.CONTENT_REFUSED})
# Answers kept as a Reply: those above, and context_too_long, shown if nothing better comes.
_KEPT = _RETURNED_AS_IS | {Outcome.CONTEXT_TOO_LONG}
_SKIPS = frozenset(
    {
        Outcome.BREAKER_OPEN,
        Outcome.PROVIDER_FULL,
        Outcome.OUT_OF_BUDGET,
        Outcome.UNSUPPORTED,
        Outcome.MODEL_MISSING,
    }
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
_JSON = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))


async def run(call: Call, routes: Sequence[Route[Provider]]) -> Reply | StreamStart:
    """Try ``routes`` in order; return the first answer or raise :class:`GatewayError`."""
    if routes:
        call.first_route = routes[0].provider
    try:
        return await _walk(call, routes)
    finally:
        _settle_deferred(call)


async def _walk(call: Call, routes: Sequence[Route[Provider]]) -> Reply | StreamStart:
    loop = asyncio.get_running_loop()
    previous: AttemptRecord | None = None
    kept_reply: Reply | None = None  # a context_too_long answer, shown if nothing better
    hedged: set[int] = set()  # routes a hedge has tried already
    for n, route in enumerate(routes):
        if n in hedged:
            continue
        if loop.time() >= call.deadline:
            break
        if previous is not None:
            _log_failover(call, previous, route.provider)
        if call.stream and route.provider.hedge is not None:
            result = await hedge.race(call, routes, n, hedged, _try_provider, _usable)
        else:
            others = any(_usable(call, later) for later in routes[n + 1 :])
            result = await _try_provider(call, route, others)
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


def _usable(call: Call, route: Route[Provider]) -> bool:
    """True when ``route`` could be tried now (for sharing the request's time)."""
    provider = route.provider
    return (
        call.endpoint in provider.dialect.endpoints
        and provider.usable()
        and not provider.lacks_model(route.model)
    )


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


async def _try_provider(
    call: Call, route: Route[Provider], others: bool
) -> Reply | StreamStart | None:
    """Every try on one provider; None when the loop should move on.

    ``others`` says whether another usable provider follows, so that this one may not
    spend the whole of the request's remaining time.
    """
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
    permit = await provider.admit()
    if permit is None:
        _skip_open(call, provider)
        return None
    lease = Lease(provider, permit)
    handed_over = False
    try:  # from here on, every path gives the permit back (a trial above all)
        # Encoded once: retries and a stale-connection resend send the same bytes.
        try:
            out = provider.dialect.request(call, route.model)
        except Unsupported as e:  # the dialect cannot say it: another provider may
            _record(call, provider, Classified(Outcome.UNSUPPORTED, str(e)))
            return None
        except BadRequest as e:  # what the upstream would have said: the client's 400
            cls = Classified(Outcome.CLIENT_ERROR, str(e), 400)
            _record(call, provider, cls)
            return Reply(provider, cls.outcome, 400, _JSON, error_body(str(e)))
        if not await _take_slot(call, lease):
            return None
        tries = 0
        wait = 0.0
        stale_resent = False
        while True:
            cls, answer = await _send(call, provider, out, lease, others)
            if cls is _STALE:
                if not stale_resent:
                    stale_resent = True
                    _record(call, provider, cls, wait)
                    continue
                cls = _CLOSED_AGAIN
            if cls.detail:  # an upstream's words: they may quote the key back
                cls = replace(cls, detail=provider.redact.text(cls.detail))
            _record(call, provider, cls, wait)
            if isinstance(answer, StreamStart):
                handed_over = True
                _charged(call, lease)
                return answer
            if answer is not None and answer.outcome in _KEPT:
                lease.judge(cls.outcome)
                _charged(call, lease)
                return answer
            if request_fault(cls):
                # Judged once the request is over: if another provider refuses it the same
                # way, it is the request's fault and no breaker is charged.
                call.deferred.append((lease.detach(), cls))
                if _refused_alike(call, provider, cls) and answer is not None:
                    call.poisoned = True
                    return answer  # the upstream's own words say it best
                call.refusals.append((provider, error_shape(cls)))
                return None
            lease.judge(cls.outcome, _open_for(cls, provider), cls.detail)
            if not POLICY[cls.outcome].retry_same or tries >= cfg.max_retries:
                return None
            delay = (
                cls.retry_after
                if cls.retry_after is not None
                else random.uniform(0, min(cfg.backoff_max, cfg.backoff_base * 2**tries))
            )
            budget = provider.budget
            if budget.active:  # a resend spends the rate budget like any request
                delay = max(delay, budget.wait(lease.tokens, budgets.now()))
            # One backoff budget for the whole request: a request sleeps through a long
            # Retry-After at most once, whichever provider asked for it.
            if call.backoff + delay > cfg.max_retry_wait or loop.time() + delay >= call.deadline:
                return None  # the wait asked for is too long: fail over at once
            await asyncio.sleep(delay)
            call.waited += delay
            call.backoff += delay
            permit = await provider.admit()
            if permit is None:  # opened meanwhile, or another request is the half-open trial
                _skip_open(call, provider, delay)
                return None
            lease.permit = permit
            if budget.active:
                budget.charge(lease.tokens, budgets.now())
            tries += 1
            wait = delay
    finally:
        if not handed_over:
            lease.finish(Outcome.CANCELLED)


def _refused_alike(call: Call, provider: Provider, cls: Classified) -> bool:
    """True when another provider refused this request with the same error."""
    shape = error_shape(cls)
    return any(p is not provider and s == shape for p, s in call.refusals)


def _settle_deferred(call: Call) -> None:
    """Give the breakers their verdicts on request-fault errors, once the request is over:
    nothing when two providers refused it alike (the request's fault), else a failure."""
    for (breaker, permit), cls in call.deferred:
        if call.poisoned:
            breaker.release(permit)
        else:
            breaker.record_failure(permit, None, Cause(cls.outcome.value, cls.detail))
    call.deferred.clear()


def _charged(call: Call, lease: Lease) -> None:
    """The answer comes from ``lease``: its budget's token charge is corrected from usage."""
    if lease.tokens:
        call.token_charges += (lease.provider.budget,)


async def _take_slot(call: Call, lease: Lease) -> bool:
    """A concurrency slot and the rate budget for ``lease``; False (recorded) when they did
    not come in time.

    Both are waited for in the provider's one FIFO queue, up to ``max_queue_wait``. A
    request whose budget cannot refill within that wait (counting those in line before it)
    moves on at once, with the refill time as its retry hint.
    """
    provider = lease.provider
    limiter = provider.limiter
    budget = provider.budget
    tokens = budgets.cost(call, budget) if budget.active else 0
    if limiter.try_acquire(tokens):
        lease.hold_slot(tokens)
        return True
    loop = asyncio.get_running_loop()
    remaining = call.deadline - loop.time()
    queue_wait = provider.config.max_queue_wait
    wait = min(queue_wait, remaining)
    if limiter.budget_wait(tokens) > wait:
        _out_of_budget(call, provider, tokens)
        return False
    # A free slot with a queue: the budget holds the line.
    histogram = metrics.BUDGET_WAIT if limiter.slot_free() else metrics.QUEUE_WAIT
    start = time.perf_counter()
    got = await limiter.acquire(wait, tokens)
    waited = time.perf_counter() - start
    call.waited += waited
    histogram.labels(provider.name).observe(waited)
    if got:
        lease.hold_slot(tokens)
    elif remaining < queue_wait and loop.time() >= call.deadline:
        _record(call, provider, Classified(Outcome.DEADLINE, "request deadline reached in queue"))
    elif budget.active and limiter.slot_free():
        _out_of_budget(call, provider, tokens)
    else:
        _record(call, provider, Classified(Outcome.PROVIDER_FULL, "no free slot"))
    return got


def _out_of_budget(call: Call, provider: Provider, tokens: int) -> None:
    """Record a move past a provider whose rate budget is spent, with when it refills."""
    refill = provider.budget.wait(tokens, budgets.now())
    detail = f"rate budget spent; refills in {refill:.1f}s"
    _record(call, provider, Classified(Outcome.OUT_OF_BUDGET, detail, None, refill))


def _open_for(cls: Classified, provider: Provider) -> float | None:
    """How long the upstream asked the breaker to stay open, beyond the usual rule."""
    if cls.outcome is Outcome.QUOTA_EXHAUSTED:
        return provider.config.quota_reset_timeout
    if cls.outcome is Outcome.RATE_LIMITED and cls.retry_after:
        return clamp_seconds(cls.retry_after, provider.config.quota_reset_timeout)
    return None


async def _send(
    call: Call, provider: Provider, out: Outgoing, lease: Lease, others: bool
) -> tuple[Classified, Reply | StreamStart | None]:
    """One request to one provider, up to a complete body or a stream's first token."""
    cfg = provider.config
    session = provider.session
    assert session is not None  # started by the app's cleanup context
    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    remaining = call.deadline - sent_at
    own = cfg.first_token_timeout if call.stream else cfg.response_timeout
    # With another provider left, leave it half of the time that remains.
    share = remaining / 2 if others else remaining
    limit = min(own, share)
    url, body, translator = out
    headers = {**provider.headers, "X-Request-Id": call.request_id}
    start = time.perf_counter()
    resp: aiohttp.ClientResponse | None = None
    handed_over = False
    task = asyncio.current_task()
    assert task is not None
    provider.waiting.add(task)  # cancelled with STALLED if the provider is found hung
    REUSED.set(False)
    try:
        async with asyncio.timeout(limit):
            try:
                resp = await session.post(url, data=body, headers=headers, allow_redirects=False)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
                if isinstance(e, aiohttp.ClientConnectorError):
                    raise
                if REUSED.get() and time.perf_counter() - start < _STALE_WITHIN:
                    return _STALE, None
                raise
            provider.last_byte = loop.time()
            provider.waiting.discard(task)  # bytes came back: not hung, whatever follows
            # x-ratelimit-* (a vendor's own, translated): slow down before a 429
            provider.budget.learn(translator.headers(resp.headers))
            if resp.status >= 300 or not call.stream:
                return await read_answer(provider, resp, translator)
            cls, start_ = await hold(lease, resp, call.request_id, translator)
            handed_over = start_ is not None
            return cls, start_
    except TimeoutError as e:
        if limit < own:  # the request's time ran out, not the provider's own timeout
            provider.waiting.discard(task)  # the evidence may move waiting requests on
            _stall_evidence(call, provider, lease, loop.time() - sent_at, sent_at)
            if limit >= remaining:
                return Classified(Outcome.DEADLINE, "request deadline reached"), None
            return Classified(Outcome.BUDGET, f"no answer within its {limit:.1f}s share"), None
        if resp is None and isinstance(e, aiohttp.ServerTimeoutError):
            return Classified(
                Outcome.TIMEOUT, f"connect timed out after {cfg.connect_timeout:g}s"
            ), None
        what = "first token" if call.stream else "response"
        return Classified(Outcome.TIMEOUT, f"no {what} within {limit:g}s"), None
    except (aiohttp.ClientError, OSError) as e:
        return classify_exception(e), None
    except asyncio.CancelledError as e:
        provider.waiting.discard(task)
        waited = loop.time() - sent_at
        if e.args == (STALLED,):  # the breaker opened on a hung provider: go elsewhere
            task.uncancel()
            detail = f"provider stalled: no byte for {waited:.1f}s"
            return Classified(Outcome.TIMEOUT, detail), None
        if e.args == (hedge.LOST,):  # the request went elsewhere: not this provider's fault
            task.uncancel()
            return Classified(Outcome.CANCELLED, hedge.LOST), None
        _gave_up(call, provider, lease, waited, sent_at)
        raise
    finally:
        provider.waiting.discard(task)
        call.waited += time.perf_counter() - start
        if resp is not None and not handed_over:
            resp.close()


def _gave_up(call: Call, provider: Provider, lease: Lease, waited: float, sent_at: float) -> None:
    """The client left (or the gateway is stopping) while ``provider`` had not answered:
    the attempt is recorded with how long it waited, and may be evidence of a hang."""
    detail = f"the client left after {waited:.1f}s waiting on {provider.display_name}"
    _record(call, provider, Classified(Outcome.CANCELLED, detail))
    call.waiting_on, call.waited_for = provider.name, waited
    _stall_evidence(call, provider, lease, waited, sent_at)


def _stall_evidence(
    call: Call, provider: Provider, lease: Lease, waited: float, sent_at: float
) -> None:
    """One breaker failure (``stalled``) for a request that waited ``stall_timeout`` or more
    without a byte back while no other request there got one either: a hung provider,
    whether the client gave up or the request's own time ran out. The provider's own
    timeout, which would have counted too, never fires for this attempt now."""
    if waited >= provider.config.stall_timeout and provider.last_byte < sent_at:
        why = f"no byte for {waited:.1f}s"
        provider.breaker.record_failure(lease.permit, None, Cause(STALLED_KIND, why))


_LATER = frozenset({Outcome.RATE_LIMITED, Outcome.PROVIDER_FULL, Outcome.OUT_OF_BUDGET})


def _busy(record: AttemptRecord) -> bool:
    """True for an attempt that says "later": rate limited, full, out of budget, or open
    because of a rate limit."""
    return record.outcome in _LATER or (
        record.outcome is Outcome.BREAKER_OPEN and record.cause == Outcome.RATE_LIMITED.value
    )


def _give_up(call: Call, routes: Sequence[Route[Provider]]) -> GatewayError:
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
    # Jittered, so that clients that honour it do not all come back in the same second.
    retry_after = max(1, math.ceil(min(positive) * random.uniform(1.0, 1.2))) if positive else 1
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
