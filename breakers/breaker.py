"""A provider's circuit breaker, on aiobreaker's state machine.

aiobreaker 1.2.0 is kept for its states, storage and listeners, but three of its habits
do not fit a gateway, so this layer takes over the parts that have them:

* it admits every concurrent call while half-open; here exactly one trial is let through
  (:meth:`ProviderBreaker.try_acquire` hands out one trial :class:`Permit`);
* it compares ``datetime.utcnow()`` with ``datetime.now()``, so reopen times are wrong
  outside UTC (and ``utcnow`` is deprecated); here every deadline is on the monotonic
  clock and the stored ``opened_at`` is an aware UTC datetime;
* any success resets its failure count, so a health probe must never pass through its
  ``call`` path; here requests and probes report through separate methods.

Outcomes are reported explicitly (:meth:`record_success`, :meth:`record_failure`,
:meth:`release`), because a stream is judged by how it ends, not by a function return.
Two rules keep the state machine honest when it is fed from two sides (requests and
probes):

* every opening starts a new *epoch*, and a permit remembers the epoch it was issued in:
  the verdict of a request admitted before the breaker opened moves nothing (a slow
  stream that ends well does not close a breaker that a quota error opened; a late
  failure does not reopen it during another request's trial);
* an open period the upstream asked for (``open_for``: out of quota, ``Retry-After``) is
  *firm*: a good probe does not shorten it, because a model list answers while the quota
  is gone. A probe may half-open a breaker that ordinary failures opened.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Protocol

import aiobreaker
from aiobreaker import CircuitBreakerListener, CircuitBreakerState
from aiobreaker.storage.memory import CircuitMemoryStorage


class State(StrEnum):
    """Breaker states as reported to operators and metrics."""

    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


_FROM_AIO = {
    CircuitBreakerState.CLOSED: State.CLOSED,
    CircuitBreakerState.HALF_OPEN: State.HALF_OPEN,
    CircuitBreakerState.OPEN: State.OPEN,
}


def state_of(aio_state: object) -> State:
    """Map an aiobreaker state object (as given to listeners) to :class:`State`."""
    return _FROM_AIO[aio_state.state]  # type: ignore[attr-defined]


class _AioBreaker(aiobreaker.CircuitBreaker):
    """aiobreaker with an aware, timezone-independent ``opened_at``."""

    def open(self) -> None:
        """Open the circuit, recording the time in UTC (aiobreaker uses naive utcnow)."""
        self._state_storage.opened_at = datetime.now(UTC)
        self.state = self._state_storage.state = CircuitBreakerState.OPEN


@dataclass(slots=True)
class Permit:
    """Leave to send one request; ``trial`` marks the single half-open probe request."""

    trial: bool
    epoch: int = 0  # the breaker's epoch when the permit was issued
    done: bool = False


#: The kind of :class:`Cause` for a provider that stopped answering without dying.
STALLED_KIND = "stalled"


@dataclass(frozen=True, slots=True)
class Cause:
    """Why a breaker counted a failure: a short kind and the upstream's words."""

    kind: str  # e.g. "rate_limited", "unreachable"
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} ({self.detail})" if self.detail else self.kind


class Observer(Protocol):
    """Told of the decisions a breaker takes on its own evidence (not of those applied
    from elsewhere with the ``apply_*`` methods), so that other processes can follow."""

    def opened(self, duration: float, firm: bool, cause: Cause | None) -> None:
        """The breaker opened (or its open period grew) for ``duration`` seconds."""

    def closed(self) -> None:
        """A trial request succeeded: the breaker closed."""

    def failed(self, cause: Cause | None) -> None:
        """A request failed and was counted (probe failures travel as probe results)."""

    def reset(self) -> None:
        """A request succeeded after counted failures: the count went back to zero."""

    def trial_ended(self) -> None:
        """The half-open trial's permit was settled, whatever its verdict."""


class ProviderBreaker:
    """One provider's breaker: admission, outcome recording and probe feedback.

    ``fail_max`` consecutive failures open it for ``reset_timeout`` seconds; after that
    one trial request is admitted, whose outcome closes or reopens it. A failure can ask
    for a longer open period (``open_for``), as quota errors and ``Retry-After`` do.
    """

    def __init__(
        self,
        name: str,
        fail_max: int = 5,
        reset_timeout: float = 30.0,
        *,
        listeners: Iterable[CircuitBreakerListener] = (),
        trial_timeout: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.reset_timeout = reset_timeout
        self._clock = clock
        self._storage = CircuitMemoryStorage(CircuitBreakerState.CLOSED)
        self._cb = _AioBreaker(
            fail_max=fail_max,
            timeout_duration=timedelta(seconds=reset_timeout),
            listeners=list(listeners),
            state_storage=self._storage,
            name=name,
        )
        self._open_until = 0.0  # monotonic
        self._firm_until = 0.0  # monotonic end of an open period the upstream asked for
        self._epoch = 0  # incremented at every opening
        self.cause: Cause | None = None  # why it last opened
        self._trial_since: float | None = None  # monotonic start of the trial in flight
        self._trial_timeout = trial_timeout
        # Monotonic end of a trial that another process runs (its lease's expiry).
        self._trial_elsewhere_until = 0.0
        self.observer: Observer | None = None  # set when the state is shared

    # -- reading ---------------------------------------------------------------

    @property
    def fail_max(self) -> int:
        """Consecutive failures that open the breaker."""
        return int(self._cb.fail_max)

    @property
    def fail_counter(self) -> int:
        """Consecutive failures recorded so far."""
        return int(self._storage.counter)

    @property
    def epoch(self) -> int:
        """How many times the breaker has opened."""
        return self._epoch

    @property
    def firm(self) -> bool:
        """True while an open period that the upstream asked for is running."""
        return self._clock() < self._firm_until

    @property
    def state(self) -> State:
        """The current state; an open breaker whose time is up reads as half-open."""
        state = _FROM_AIO[self._cb.current_state]
        if state is State.OPEN and self._clock() >= self._open_until:
            self._cb.half_open()
            state = State.HALF_OPEN
        return state

    def open_remaining(self) -> float:
        """Seconds left of the current open period (0 when none is running)."""
        return max(0.0, self._open_until - self._clock())

    def retry_in(self) -> float:
        """Seconds until this breaker may admit a request (0 when it would now)."""
        state = self.state
        if state is State.OPEN:
            return max(0.0, self._open_until - self._clock())
        if state is State.HALF_OPEN and self._trial_busy():
            return 1.0  # the trial's outcome is not known yet
        return 0.0

    @property
    def opened_at(self) -> datetime | None:
        """When the breaker last opened (aware, UTC), or None if it never did."""
        opened = self._storage.opened_at
        return opened if isinstance(opened, datetime) else None

    def reopen_at(self) -> datetime | None:
        """Wall-clock time at which an open breaker admits a trial, or None."""
        if self.state is not State.OPEN:
            return None
        return datetime.now(UTC) + timedelta(seconds=self._open_until - self._clock())

    # -- admission -------------------------------------------------------------

    def _trial_busy(self) -> bool:
        since = self._trial_since
        now = self._clock()
        if since is not None and now - since < self._trial_timeout:
            return True
        return now < self._trial_elsewhere_until

    def try_acquire(self) -> Permit | None:
        """A permit to send one request, or None when the breaker refuses it."""
        state = self.state
        if state is State.CLOSED:
            return Permit(False, self._epoch)
        if state is State.OPEN or self._trial_busy():
            return None
        self._trial_since = self._clock()
        return Permit(True, self._epoch)

    def _settle(self, permit: Permit) -> bool:
        """Mark ``permit`` used; True when its verdict may move the breaker."""
        if permit.done:
            return False
        permit.done = True
        if permit.trial:
            self._trial_since = None
            if self.observer is not None:
                self.observer.trial_ended()
        return permit.epoch == self._epoch

    # -- outcomes of requests --------------------------------------------------

    def record_success(self, permit: Permit) -> None:
        """The request behind ``permit`` succeeded: reset the count, close if trial.

        A permit issued before the breaker last opened changes nothing.
        """
        if not self._settle(permit):
            return
        observer = self.observer
        if observer is not None and self._storage.counter:
            observer.reset()
        self._storage.reset_counter()
        if _FROM_AIO[self._cb.current_state] is not State.CLOSED:
            self._cb.close()
            if observer is not None:
                observer.closed()
        for listener in self._cb.listeners:
            listener.success(self._cb)

    def record_failure(
        self, permit: Permit | None, open_for: float | None = None, cause: Cause | None = None
    ) -> None:
        """The request behind ``permit`` (None: a probe) failed.

        ``open_for`` is a period the upstream asked for: the breaker opens at once for at
        least that long, and probes do not shorten it. A permit issued before the breaker
        last opened changes nothing.
        """
        if permit is not None and not self._settle(permit):
            return
        if permit is not None and self.observer is not None and open_for is None:
            self.observer.failed(cause)
        self._fail(open_for, open_for is not None, cause)

    def _fail(
        self, open_for: float | None, firm: bool, cause: Cause | None, local: bool = True
    ) -> None:
        self._storage.increment_counter()
        for listener in self._cb.listeners:
            listener.failure(self._cb, None)
        state = self.state
        if open_for is not None:
            self._open(max(open_for, self._open_until - self._clock()), firm, cause, local)
        elif state is State.HALF_OPEN or (
            state is State.CLOSED and self.fail_counter >= self.fail_max
        ):
            self._open(self.reset_timeout, False, cause, local)

    def release(self, permit: Permit) -> None:
        """The request ended without a verdict on the provider (client went away, etc.)."""
        self._settle(permit)

    # -- probe feedback --------------------------------------------------------

    def probe_succeeded(self) -> None:
        """A good probe: an open breaker goes half-open so the next request is the trial.

        It does not reset the failure count (a provider whose model list answers can
        still fail every completion), and it does not end an open period that the
        upstream asked for (:meth:`record_failure`'s ``open_for``).
        """
        if _FROM_AIO[self._cb.current_state] is State.OPEN and not self.firm:
            self._open_until = self._clock()
            self._cb.half_open()

    def probe_failed(self, unreachable: bool = False, cause: Cause | None = None) -> None:
        """A failed probe counts as one failure; it reopens a half-open breaker.

        ``unreachable`` (the connection was refused: the provider is off) opens the
        breaker at once, so traffic stops within one probe interval. The observer is not
        told: a probe's result travels whole, and every process applies it alike.
        """
        if self.state is State.HALF_OPEN and self._trial_busy():
            return  # the trial request in flight will decide
        if unreachable and self.state is not State.OPEN:
            self._fail(self.reset_timeout, False, cause, local=False)
        else:
            self._fail(None, False, cause, local=False)

    def _open(self, duration: float, firm: bool, cause: Cause | None, local: bool = True) -> None:
        now = self._clock()
        self._open_until = now + duration
        self._trial_elsewhere_until = 0.0  # whoever ran it, a trial ends with an opening
        if firm:
            self._firm_until = max(self._firm_until, self._open_until)
        if cause is not None:
            self.cause = cause
        if _FROM_AIO[self._cb.current_state] is not State.OPEN:
            self._epoch += 1
            self._cb.open()
        else:
            self._storage.opened_at = datetime.now(UTC)
        if local and self.observer is not None:
            self.observer.opened(duration, firm, cause)

    # -- state learned from other processes -------------------------------------
    # What another gateway process decided, applied here without telling the observer
    # (it came from there). Each keeps this breaker's own rules: an opening starts a new
    # epoch, a firm period is not shortened by a good probe.

    def apply_open(self, duration: float, firm: bool, cause: Cause | None) -> None:
        """Another process opened this provider's breaker for ``duration`` seconds."""
        if duration <= 0:
            return
        self._open(max(duration, self._open_until - self._clock()), firm, cause, local=False)

    def apply_close(self) -> None:
        """Another process's trial request succeeded: close, and forget the failures."""
        self._trial_elsewhere_until = 0.0
        self._storage.reset_counter()
        if _FROM_AIO[self._cb.current_state] is not State.CLOSED:
            self._cb.close()

    def apply_failure(self, cause: Cause | None) -> None:
        """A request failed in another process: it counts here too, while closed."""
        if self.state is State.CLOSED:
            self._fail(None, False, cause, local=False)

    def apply_reset(self) -> None:
        """A request succeeded in another process: the consecutive failures start over."""
        if self.state is State.CLOSED:
            self._storage.reset_counter()

    def trial_elsewhere(self, seconds: float) -> None:
        """Another process runs the half-open trial for up to ``seconds``: none here."""
        self._trial_elsewhere_until = self._clock() + seconds

    def trial_freed(self) -> None:
        """The trial another process ran ended without a verdict: one may run here."""
        self._trial_elsewhere_until = 0.0
