"""A per-provider admission queue: a concurrency limit and a rate budget, one FIFO line.

A request is admitted when a slot is free (``max_concurrency``) and the provider's
:class:`~gateway.budgets.Budget` has a request (and its tokens) left. Those that cannot be
admitted at once wait in one bounded first-come-first-served queue, whichever of the two
holds them up: the first in line is served first, the others wait behind it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from gateway.budgets import now

if TYPE_CHECKING:
    from gateway.budgets import Budget


def share_of(limit: int, workers: int) -> int:
    """One worker's share of a machine's concurrency ``limit`` (0: none), at least one."""
    return max(1, limit // workers) if limit else 0


class Limiter:
    """Up to ``max_concurrency`` holders (0: no limit), at most ``max_queue`` waiting, and
    each admission paid from ``budget`` when it is active.

    :meth:`acquire` answers False instead of waiting past its timeout or joining a full
    queue, so the caller can move on to another provider. A slot freed while others
    wait passes straight to the first of them; a budget that refills wakes it on a timer.
    """

    __slots__ = ("_max", "_max_queue", "_queued_tokens", "_timer", "_waiters", "budget", "in_use")

    def __init__(
        self, max_concurrency: int = 0, max_queue: int = 100, budget: Budget | None = None
    ) -> None:
        self._max = max_concurrency
        self._max_queue = max_queue
        self._waiters: deque[tuple[asyncio.Future[None], int]] = deque()  # (waiter, tokens)
        self._queued_tokens = 0
        self._timer: asyncio.TimerHandle | None = None
        self.budget = budget
        self.in_use = 0
        if budget is not None:
            budget.wake = self._wake  # a usage correction may let the first in line go

    @property
    def queued(self) -> int:
        """Requests waiting for a slot or for budget."""
        return len(self._waiters)

    def slot_free(self) -> bool:
        """True when the concurrency limit would admit one more."""
        return not self._max or self.in_use < self._max

    def budget_wait(self, tokens: int) -> float:
        """Seconds until the budget admits a request of ``tokens`` after everyone in line
        (0 without a budget): a request that cannot be served within its own wait need
        not queue at all."""
        budget = self.budget
        if budget is None or not budget.active:
            return 0.0
        return budget.wait(tokens, now(), len(self._waiters), self._queued_tokens)

    def try_acquire(self, tokens: int = 0) -> bool:
        """Take a slot and the budget at once, when nobody waits; False otherwise."""
        if self._waiters or (self._max and self.in_use >= self._max):
            return False
        budget = self.budget
        if budget is not None and budget.active and not budget.take(tokens, now()):
            return False
        self.in_use += 1
        return True

    async def acquire(self, wait: float, tokens: int = 0) -> bool:
        """Take a slot and the budget for ``tokens``, waiting up to ``wait`` seconds in
        line; False if they did not come."""
        if self.try_acquire(tokens):
            return True
        if len(self._waiters) >= self._max_queue or wait <= 0:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (fut, tokens)
        self._waiters.append(entry)
        self._queued_tokens += tokens
        if len(self._waiters) == 1:
            self._wake()  # first in line, held by the budget: set its timer
        try:
            async with asyncio.timeout(wait):
                await fut
        except TimeoutError:
            # Admitted just as the timeout fired?
            return fut.done() and not fut.cancelled()
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._give_back(tokens)  # admitted just as we were cancelled
            raise
        finally:
            if not fut.done():
                fut.cancel()
            if entry in self._waiters:  # left the line: the next one may go now
                self._waiters.remove(entry)
                self._queued_tokens -= tokens
                self._wake()
        return True

    def _give_back(self, tokens: int) -> None:
        """Undo an admission whose request was never sent."""
        if self.budget is not None and self.budget.active:
            self.budget.refund(tokens)
        self.release()

    def release(self) -> None:
        """Give a slot back; the first in line takes it if the budget lets it."""
        self.in_use -= 1
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        """Admit waiters from the head of the line while a slot and the budget allow; when
        only the budget holds the first one, come back when it will have refilled."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiters = self._waiters
        budget = self.budget
        while waiters:
            fut, tokens = waiters[0]
            if not fut.done():
                if self._max and self.in_use >= self._max:
                    return  # release() comes back
                if budget is not None and budget.active:
                    at = now()
                    wait = budget.wait(tokens, at)
                    if wait > 0:
                        loop = asyncio.get_running_loop()
                        self._timer = loop.call_later(wait, self._wake)
                        return
                    budget.charge(tokens, at)
                self.in_use += 1
                fut.set_result(None)
            waiters.popleft()
            self._queued_tokens -= tokens
