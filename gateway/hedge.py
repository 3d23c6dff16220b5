"""Hedged first tokens: a stream that is slow to start is asked of the next provider too.

A provider with ``hedge_after`` (seconds, or ``"p95"``: the 95th percentile of its recent
times to first token) has its stream attempts raced: when no first token has come after
that long, the same request goes to the next usable provider of the chain as well, and the
request commits to whichever produces a first token first. The other is cancelled at once,
its request closed, and its breaker is not charged (the attempt is ``cancelled``). Both
providers may bill for the request: hedging is opt-in per provider for that reason.

``gateway_hedges_total{result}`` counts hedges ``started`` and how each ended: ``won`` (the
hedge's first token came first), ``cancelled`` (the first provider's came first) or
``failed`` (the hedge got no answer).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from gateway import metrics
from gateway.call import Call, Reply, StreamStart
from gateway.errors import Outcome
from gateway.routing import Route

if TYPE_CHECKING:
    from gateway.upstream import Provider

log = logging.getLogger("gateway")

#: The cancel message of the attempt that lost a race: not a failure of its provider.
LOST = "another provider's first token came first (hedge)"
_SAMPLES = 100  # recent times to first token kept for "p95"
_MIN_SAMPLES = 20  # fewer: no hedging yet

Result = Reply | StreamStart | None
Attempt = Callable[[Call, "Route[Provider]", bool], Awaitable[Result]]
Usable = Callable[[Call, "Route[Provider]"], bool]


class Hedge:
    """A provider's hedging rule, and its recent times to first token for ``"p95"``."""

    __slots__ = ("after", "times")

    def __init__(self, after: float | str) -> None:
        self.after = after
        self.times: deque[float] = deque(maxlen=_SAMPLES)

    def delay(self) -> float | None:
        """Seconds without a first token before hedging; None: not now (too few samples)."""
        if not isinstance(self.after, str):
            return self.after
        times = self.times
        if len(times) < _MIN_SAMPLES:
            return None
        return sorted(times)[math.ceil(0.95 * len(times)) - 1]

    def observe(self, seconds: float) -> None:
        """A stream attempt here had its first token after ``seconds`` (or was given up
        after that long: it would have taken longer)."""
        if isinstance(self.after, str):
            self.times.append(seconds)


async def race(
    call: Call,
    routes: list[Route[Provider]],
    n: int,
    tried: set[int],
    attempt: Attempt,
    usable: Usable,
) -> Result:
    """``attempt`` on ``routes[n]``, hedged on the next usable route when its first token
    is late: the first answer of the two (a stream with its first token, or an answer the
    client must see), else the other's; routes a hedge tried are added to ``tried``."""
    route = routes[n]
    hedge = route.provider.hedge
    assert hedge is not None
    loop = asyncio.get_running_loop()
    began = loop.time()
    others = any(usable(call, later) for later in routes[n + 1 :])
    first = asyncio.ensure_future(attempt(call, route, others))
    order = {first: (route, began)}  # each attempt's route and when it began
    second: asyncio.Future[Result] | None = None
    winner: asyncio.Future[Result] | None = None
    try:
        delay = hedge.delay()
        if delay is not None:
            await asyncio.wait({first}, timeout=delay)
        late = delay is not None and not first.done()
        m = _next(call, routes, n, tried, usable) if late else None
        if m is not None:
            tried.add(m)
            metrics.HEDGES.labels("started").inc()
            log.info(
                "%s: no first token after %.2fs, hedging on %s [%s]",
                route.provider.display_name,
                loop.time() - began,
                routes[m].provider.display_name,
                call.request_id,
            )
            later = any(usable(call, r) for r in routes[m + 1 :])
            second = asyncio.ensure_future(attempt(call, routes[m], later))
            order[second] = (routes[m], loop.time())
        kept: Reply | None = None
        pending = set(order)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=list(order).index):  # the earlier route first
                result = task.result()
                if isinstance(result, StreamStart):
                    _observe(*order[task], loop)
                if _final(result):
                    winner = task
                    return result
                if isinstance(result, Reply):
                    kept = result  # context_too_long: shown if nothing better comes
        return kept
    finally:
        if second is not None:
            metrics.HEDGES.labels(_ended(second, winner)).inc()
        await _cancel_rest(order, winner, loop)


def _next(
    call: Call, routes: list[Route[Provider]], n: int, tried: set[int], usable: Usable
) -> int | None:
    """The next usable route after ``routes[n]`` on another provider, not tried yet."""
    provider = routes[n].provider
    for m in range(n + 1, len(routes)):
        route = routes[m]
        if m not in tried and route.provider is not provider and usable(call, route):
            return m
    return None


def _final(result: Result) -> bool:
    """True for an answer that ends the walk: a stream, or a reply the client sees."""
    if isinstance(result, Reply):
        return result.outcome is not Outcome.CONTEXT_TOO_LONG
    return result is not None


def _ended(second: asyncio.Future[Result], winner: asyncio.Future[Result] | None) -> str:
    """How a started hedge ended, for the metric."""
    if second is winner:
        return "won"
    if second.done() and not second.cancelled() and second.exception() is None:
        return "failed"  # it answered nothing usable
    return "cancelled"  # the first provider answered first, or the client left


def _observe(route: Route[Provider], began: float, loop: asyncio.AbstractEventLoop) -> None:
    """The attempt on ``route`` that began at loop time ``began`` has its first token now
    (or is given up now)."""
    hedge = route.provider.hedge
    if hedge is not None:
        hedge.observe(loop.time() - began)


async def _cancel_rest(
    order: dict[asyncio.Future[Result], tuple[Route[Provider], float]],
    winner: asyncio.Future[Result] | None,
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Cancel the attempts still running and give back a stream that lost by a hair. With
    a winner they lost the race: each closes its request and releases its breaker without
    a verdict; without one the request itself is over (the client left)."""
    running = [task for task in order if not task.done()]
    for task in running:
        if winner is not None:
            _observe(*order[task], loop)  # it would have taken longer than this
            task.cancel(LOST)
        else:
            task.cancel()
    if running:
        await asyncio.wait(running, timeout=5)
    for task in order:
        if task is winner or not task.done() or task.cancelled() or task.exception():
            continue
        result = task.result()
        if isinstance(result, StreamStart):
            result.lease.finish(Outcome.CANCELLED)
            result.resp.close()
