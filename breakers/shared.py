"""Breaker state shared by every process that watches the same providers.

Each process keeps its own :class:`~breakers.breaker.ProviderBreaker` per provider, and
requests read only that: no round trip per request. What one process learns on its own
evidence is published on a :class:`Bus` and applied by the others:

* ``open``: a breaker opened (or its open period grew), for how long, whether the
  upstream asked for it (firm), and why;
* ``fail`` and ``reset``: a request failure was counted, or a success after failures
  reset the count, so that failures count across processes (five failures spread over
  three processes open every breaker with ``fail_max = 5``);
* ``close``: the half-open trial succeeded;
* ``free``: the trial ended without a verdict (its client left), so another may run;
* ``probe``: a health probe's result, so that one process probes each provider per
  interval instead of every process.

Half-open, exactly one trial runs across the processes: a process whose breaker offers it
a trial first claims a lease on the bus (an atomic "set if absent" with an expiry, so a
process that dies mid-trial frees it); the others skip the provider until the trial's
verdict arrives or the lease expires. Probes are spread the same way: before each probe
a process claims the provider's probe lease for most of an interval, and only the holder
probes.

Durations travel, never clock readings: a process that receives ``open for 30 s``
opens for 30 s from its own now, so clocks that disagree do not matter. A process that
joins (or rejoins after the bus was down) says ``hello``; the others answer with their
open breakers and last probe results. When the bus is down, each process decides alone,
as it would without one, and the bus's own health says so.

Messages are small JSON objects: ``r`` the sender, ``t`` the kind, ``p`` the provider.
A process ignores its own messages (it has applied them already) and anything it cannot
read (a provider it does not have, a newer message kind during a rolling upgrade).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from typing import Any, Protocol

from breakers.breaker import Cause, ProviderBreaker, State
from breakers.probes import Prober, ProbeResult

log = logging.getLogger("breakers.shared")

#: The longest cause detail sent or accepted (an upstream's words, already scrubbed).
MAX_DETAIL = 500
#: The share of a probe interval that one process's probe lease lasts: the next
#: process's jittered tick (0.8 to 1.2 intervals later) finds it expired.
PROBE_LEASE_SHARE = 0.8
#: How long a process that starts waits for the bus before its first probe, so that the
#: processes starting together do not all probe at once.
JOIN_WAIT = 2.0

Message = dict[str, Any]


class Bus(Protocol):
    """How processes reach each other: Redis pub/sub, or the supervisor of local workers.

    :meth:`publish` and :meth:`release` never wait: messages go out in order, in the
    background, and are dropped while the bus is down. The bus calls the
    :class:`Sharing`'s ``receive`` for every message, and its ``joined`` when it
    (re)connects.
    """

    replica: str  # this process, unique among those on the bus

    def publish(self, message: Message) -> None:
        """Send ``message`` to every process on the bus."""

    async def claim(self, key: str, token: str, ttl: float) -> float | None:
        """Take the lease ``key`` for ``ttl`` seconds: 0 when taken, the seconds it is
        still held by another when not, None when the bus cannot answer now."""

    def release(self, key: str, token: str) -> None:
        """Give the lease ``key`` back, if ``token`` still holds it."""


class ProviderShare:
    """One provider's breaker (and prober) connected to the bus.

    Installed as the breaker's observer: it publishes what the breaker decides on local
    evidence, and applies what the others publish.
    """

    def __init__(
        self, sharing: Sharing, name: str, breaker: ProviderBreaker, trial_ttl: float
    ) -> None:
        self.sharing = sharing
        self.name = name
        self.breaker = breaker
        self.trial_ttl = trial_ttl
        self.prober: Prober | None = None
        self._lease: str | None = None  # the trial lease this process holds
        self._verdict = False  # the held trial's verdict (open or close) went out
        breaker.observer = self

    # -- sending ----------------------------------------------------------------

    def publish(self, kind: str, **fields: Any) -> None:
        """Send a message of ``kind`` about this provider."""
        self.sharing.bus.publish(
            {"r": self.sharing.bus.replica, "t": kind, "p": self.name, **fields}
        )

    def opened(self, duration: float, firm: bool, cause: Cause | None) -> None:
        """The breaker opened on local evidence: every process opens it."""
        self._verdict = True
        self.publish("open", d=round(duration, 3), f=firm, **_cause_fields(cause))

    def closed(self) -> None:
        """The trial succeeded here: every process closes the breaker."""
        self._verdict = True
        self.publish("close")

    def failed(self, cause: Cause | None) -> None:
        """A request failure counted here counts everywhere."""
        self.publish("fail", **_cause_fields(cause))

    def reset(self) -> None:
        """A success after failures starts the count over everywhere."""
        self.publish("reset")

    def trial_ended(self) -> None:
        """The trial's permit was settled: give the lease back once its verdict (sent
        in the same call, after this) is on its way, or say that none will come."""
        token, self._lease = self._lease, None
        if token is None:
            return
        try:
            asyncio.get_running_loop().call_soon(self._end_trial, token)
        except RuntimeError:  # no loop: nothing to send through either
            pass

    def _end_trial(self, token: str) -> None:
        if not self._verdict:
            self.publish("free")
        self.sharing.bus.release(self.lease_key("trial"), token)

    def publish_probe(self, result: ProbeResult, fresh: bool = True) -> None:
        """Hand a probe result to the others (``fresh``: just measured, so it counts)."""
        self.publish(
            "probe",
            at=result.at,
            lat=round(result.latency, 6),
            err=result.error,
            m=sorted(result.models) if result.models is not None else None,
            inc=result.inconclusive,
            ref=result.refused,
            st=result.stalled,
            new=fresh,
        )

    def announce(self) -> None:
        """Tell a newcomer what this process knows: an open breaker, the last probe."""
        breaker = self.breaker
        if breaker.state is State.OPEN:
            duration = breaker.open_remaining()
            self.publish(
                "open", d=round(duration, 3), f=breaker.firm, **_cause_fields(breaker.cause)
            )
        prober = self.prober
        if prober is not None and prober.last is not None:
            self.publish_probe(prober.last, fresh=False)

    def lease_key(self, what: str) -> str:
        """The bus key of this provider's ``what`` lease (``trial`` or ``probe``)."""
        return f"{what}:{self.name}"

    # -- leases -----------------------------------------------------------------

    async def claim_trial(self) -> bool:
        """True when this process may run the half-open trial (it got the lease, or the
        bus cannot answer and each process decides alone); otherwise the breaker skips
        the provider until the other process's trial has a verdict."""
        token = self.sharing.token()
        left = await self.sharing.bus.claim(self.lease_key("trial"), token, self.trial_ttl)
        if left is None:
            return True
        if left == 0:
            self._lease, self._verdict = token, False
            return True
        self.breaker.trial_elsewhere(left)
        return False

    async def probe_turn(self) -> bool:
        """True when this process probes the provider now (it got this interval's probe
        lease, or the bus cannot answer); the others apply its published result."""
        prober = self.prober
        ttl = PROBE_LEASE_SHARE * (prober.interval if prober is not None else 1.0)
        await self.sharing.wait_joined(JOIN_WAIT)
        left = await self.sharing.bus.claim(self.lease_key("probe"), self.sharing.bus.replica, ttl)
        return left is None or left == 0

    # -- receiving --------------------------------------------------------------

    def apply(self, kind: str, message: Message) -> None:
        """Apply another process's message of ``kind``; ValueError when malformed."""
        breaker = self.breaker
        if kind == "open":
            breaker.apply_open(_number(message, "d"), message.get("f") is True, _cause(message))
        elif kind == "close":
            breaker.apply_close()
        elif kind == "fail":
            breaker.apply_failure(_cause(message))
        elif kind == "reset":
            breaker.apply_reset()
        elif kind == "free":
            breaker.trial_freed()
        elif kind == "probe":
            result = _probe_result(message)
            if self.prober is not None:  # None: this process does not probe (tests)
                self.prober.apply(result, feed=message.get("new") is True)
        else:
            handler = self.sharing.handlers.get(kind)
            if handler is None:
                raise ValueError(f"unknown message kind {kind!r}")
            handler(self.name, message)


class Sharing:
    """Every shared provider of this process, on one bus.

    ``handlers`` takes message kinds that the gateway adds (learned rate limits), each a
    function of the provider's name and the message.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.providers: dict[str, ProviderShare] = {}
        self.handlers: dict[str, Callable[[str, Message], None]] = {}
        self._tokens = itertools.count(1)
        self._joined: asyncio.Event | None = None  # set once the bus first connected

    def add(self, name: str, breaker: ProviderBreaker, trial_ttl: float) -> ProviderShare:
        """Share ``breaker`` under the provider's ``name``; a half-open trial's lease
        lasts ``trial_ttl`` seconds at most (the longest a request may wait for it)."""
        share = ProviderShare(self, name, breaker, trial_ttl)
        self.providers[name] = share
        return share

    def token(self) -> str:
        """A lease token unique to this process and claim."""
        return f"{self.bus.replica}:{next(self._tokens)}"

    def joined(self) -> None:
        """The bus (re)connected: ask the others what they know, and tell them what this
        process learned while apart."""
        self._joined_event().set()
        self.bus.publish({"r": self.bus.replica, "t": "hello"})
        for share in self.providers.values():
            share.announce()

    def _joined_event(self) -> asyncio.Event:
        if self._joined is None:
            self._joined = asyncio.Event()
        return self._joined

    async def wait_joined(self, within: float) -> None:
        """Wait up to ``within`` seconds for the bus's first connection."""
        event = self._joined_event()
        if not event.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await event.wait()

    def receive(self, message: Any) -> bool | None:
        """Apply one message from the bus (the bus calls this for every message): True
        when applied, False when it could not be read, None when it was this process's."""
        if isinstance(message, dict) and message.get("r") == self.bus.replica:
            return None
        kind = message.get("t") if isinstance(message, dict) else None
        try:
            if not isinstance(message, dict):
                raise TypeError("not an object")
            if kind == "hello":
                for share in self.providers.values():
                    share.announce()
                return True
            share = self.providers.get(message.get("p"))  # type: ignore[arg-type]
            if share is None:
                raise ValueError("unknown provider")
            share.apply(kind, message)  # type: ignore[arg-type]
        except (ValueError, TypeError) as e:
            log.debug("ignored a shared message of kind %r: %s", kind, e)
            return False
        return True


def _cause_fields(cause: Cause | None) -> dict[str, str]:
    if cause is None:
        return {}
    return {"k": cause.kind[:100], "x": cause.detail[:MAX_DETAIL]}


def _cause(message: Message) -> Cause | None:
    kind, detail = message.get("k"), message.get("x", "")
    if kind is None:
        return None
    if not isinstance(kind, str) or not isinstance(detail, str):
        raise ValueError("cause is not text")
    return Cause(kind[:100], detail[:MAX_DETAIL])


def _number(message: Message, key: str) -> float:
    value = message.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{key} is not a number")
    return float(min(value, 86400.0))  # no opening lasts beyond a day, whatever it says


def _probe_result(message: Message) -> ProbeResult:
    error = message.get("err")
    models = message.get("m")
    if error is not None and not isinstance(error, str):
        raise ValueError("err is not text")
    if models is not None and not (
        isinstance(models, list) and all(isinstance(m, str) for m in models)
    ):
        raise ValueError("m is not a list of names")
    at = message.get("at", 0.0)
    if isinstance(at, bool) or not isinstance(at, int | float) or not at >= 0:
        raise ValueError("at is not a time")
    return ProbeResult(
        at=float(at),
        latency=_number(message, "lat"),
        error=error[:MAX_DETAIL] if error is not None else None,
        models=frozenset(models) if models is not None else None,
        inconclusive=message.get("inc") is True,
        refused=message.get("ref") is True,
        stalled=message.get("st") is True,
    )
