"""A per-provider concurrency limit with a bounded first-come-first-served wait queue."""

from __future__ import annotations

import asyncio
from collections import deque


class Limiter:
    """Up to ``max_concurrency`` holders (0: no limit), at most ``max_queue`` waiting.

    :meth:`acquire` answers False instead of waiting past its timeout or joining a full
    queue, so the caller can move on to another provider. A slot freed while others
    wait passes straight to the first of them.
    """

    __slots__ = ("_max", "_max_queue", "_waiters", "in_use")

    def __init__(self, max_concurrency: int = 0, max_queue: int = 100) -> None:
        self._max = max_concurrency
        self._max_queue = max_queue
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.in_use = 0

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    def full(self) -> bool:
        """True when a new request could not get a slot at once."""
        return bool(self._max) and (self.in_use >= self._max or bool(self._waiters))

    async def acquire(self, wait: float) -> bool:
        """Take a slot, waiting up to ``wait`` seconds in line; False if none came."""
        if not self.full():
            self.in_use += 1
            return True
        if len(self._waiters) >= self._max_queue or wait <= 0:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(wait):
                await fut
        except TimeoutError:
            # The slot may have been handed over just as the timeout fired.
            return fut.done() and not fut.cancelled()
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as we were cancelled
            raise
        finally:
            if not fut.done():
                fut.cancel()
            if fut in self._waiters:
                self._waiters.remove(fut)
        return True

    def release(self) -> None:
        """Give a slot back, handing it to the first waiter if there is one."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot moves over; in_use is unchanged
                return
        self.in_use -= 1
