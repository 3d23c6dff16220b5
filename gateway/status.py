"""The live status page: an in-process recorder of recent requests, breaker transitions and
short per-provider series, and the routes that show it (``/status``, ``/status.json``,
``/status/events``, ``/status/session``).

Everything is bounded by construction: the last :data:`MAX_REQUESTS` requests and
:data:`MAX_TRANSITIONS` transitions in ring buffers, and per provider a fixed ring of
10-second request counts and of per-minute failover counts and latency histograms over
the last 15 minutes. Recording a request costs a few attribute reads, one deque append
and a few integer updates; nothing is encoded unless a page is watching. Watchers get
server-sent events from one broadcaster task (running only while someone watches), which
encodes each batch once for all of them; each watcher has a bounded queue, and one that
stops reading is dropped rather than buffered for.

Nothing from a request body reaches the page: a request is shown by its model label
(``other`` for names the configuration does not know, as in the metrics), its attempts'
providers and outcome classes, its status and timings.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import importlib.resources
import itertools
import re
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from breakers import State
from gateway.auth import SESSION_COOKIE, SESSIONS
from gateway.call import AttemptRecord
from gateway.errors import GatewayError
from gateway.report import provider_report, provider_status

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.upstream import Provider

MAX_REQUESTS = 50
MAX_TRANSITIONS = 20
MAX_WATCHERS = 32  # open /status/events streams; more get 503
WATCHER_QUEUE = 32  # batches waiting for one watcher; past that it is dropped
NONE = "none"  # the "provider" of a request that no provider answered (as in the metrics)

STEP = 10  # seconds per request-rate point
POINTS = 90  # 15 minutes of request-rate points
MINUTES = 15  # per-minute failover and latency points
# Latency histogram bucket bounds: 0.1 ms to about 2 minutes, a factor of 2^(1/4) apart,
# so a percentile read from it is within 10 % of the true value.
BOUNDS = tuple(0.0001 * 2 ** (i / 4) for i in range(82))
_MIDDLE = 2**-0.125  # a bucket's geometric middle, as a fraction of its upper bound

TICK = 1.0  # seconds between provider updates to watchers
BATCH = 0.1  # requests finishing within this are sent to watchers as one batch

WATCH_IDLE = 10 * TICK  # a watcher that got nothing for this long ends (the page reconnects)


class _Series:
    """One provider's last 15 minutes: requests per 10 s, failovers and latencies per
    minute. Slots are stamped with their period number and cleared when reused;
    :meth:`roll` points ``i``, ``m`` and ``hist`` at the current ones (once a second), so
    that recording a request is two increments."""

    __slots__ = ("counts", "failovers", "hist", "hists", "i", "m", "minute_of", "slot_of")

    def __init__(self) -> None:
        self.counts = [0] * POINTS
        self.slot_of = [-1] * POINTS
        self.failovers = [0] * MINUTES
        self.hists = [[0] * (len(BOUNDS) + 1) for _ in range(MINUTES)]
        self.minute_of = [-1] * MINUTES
        self.i = self.m = 0
        self.hist = self.hists[0]

    def roll(self, slot: int, minute: int) -> None:
        """Make ``slot`` (10 s) and ``minute`` current, clearing what they held before."""
        i = slot % POINTS
        if self.slot_of[i] != slot:
            self.slot_of[i] = slot
            self.counts[i] = 0
        m = minute % MINUTES
        if self.minute_of[m] != minute:
            self.minute_of[m] = minute
            self.failovers[m] = 0
            self.hists[m] = [0] * (len(BOUNDS) + 1)
        self.i, self.m, self.hist = i, m, self.hists[m]

    def render(self, now: float) -> dict[str, list[Any]]:
        """The sparkline points, oldest first, the current (partial) period last."""
        slot = int(now) // STEP
        counts = []
        for s in range(slot - POINTS + 1, slot + 1):
            i = s % POINTS
            counts.append(self.counts[i] if self.slot_of[i] == s else 0)
        minute = int(now) // 60
        failovers: list[int] = []
        p50: list[float | None] = []
        p95: list[float | None] = []
        for mm in range(minute - MINUTES + 1, minute + 1):
            m = mm % MINUTES
            fresh = self.minute_of[m] == mm
            failovers.append(self.failovers[m] if fresh else 0)
            hist = self.hists[m] if fresh else None
            p50.append(_percentile(hist, 0.5))
            p95.append(_percentile(hist, 0.95))
        return {"requests": counts, "failovers": failovers, "p50_ms": p50, "p95_ms": p95}


def _percentile(hist: list[int] | None, q: float) -> float | None:
    """The ``q`` quantile of a latency histogram in ms (a bucket's middle), or None."""
    total = sum(hist) if hist else 0
    if not total:
        return None
    assert hist is not None
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= rank:
            upper = BOUNDS[min(i, len(BOUNDS) - 1)]
            return round(upper * (_MIDDLE if i < len(BOUNDS) else 1.0) * 1000, 1)
    raise AssertionError("unreachable: the ranks add up to the total")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _event(name: str, data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class _Watcher:
    """One open ``/status/events`` stream: its queue of encoded batches."""

    __slots__ = ("queue", "request")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(WATCHER_QUEUE)

    def drop(self) -> None:
        """End the stream now: the client stopped reading (or the gateway stops)."""
        transport = self.request.transport
        if transport is not None:
            transport.abort()


# A finished request as kept: seq, time, request id, model label, stream, its attempts,
# provider, status, failover, latency s, time to first token s.
_Entry = tuple[int, float, str, str, bool, list[AttemptRecord], str, int, bool, float, float | None]


class StatusRecorder:
    """What the status page shows, recorded as it happens.

    ``names`` are the configured providers in failover order; :attr:`providers` is set
    once the providers exist (their breakers report transitions here from the start).
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        send_timeout: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.requests: deque[_Entry] = deque(maxlen=MAX_REQUESTS)
        self.transitions: deque[tuple[int, float, str, str, str, str]] = deque(
            maxlen=MAX_TRANSITIONS
        )
        self.series = {name: _Series() for name in (*names, NONE)}
        self.providers: list[Provider] = []
        self.send_timeout = send_timeout
        self._clock = clock
        self._seq = 0
        self._tseq = 0
        self._second = (0.0, 0.0)  # the second the series point at: [start, end)
        self._watchers: set[_Watcher] = set()
        self._wake = asyncio.Event()  # set when there is something new for watchers
        self._broadcaster: asyncio.Task[None] | None = None

    # -- recording (the request path) ------------------------------------------------

    def record(self, call: Call, model: str, elapsed: float) -> None:
        """Keep a finished request; ``model`` is its metrics label (``other`` if unknown).

        The request's attempt list is kept as it is (nothing appends to it once the
        request is over) and turned into JSON only when someone reads it.
        """
        now = self._clock()
        start, end = self._second
        if not start <= now < end:
            self._roll(now)
        answered = call.answered_by
        provider = answered.name if answered is not None else NONE
        records = call.records
        first = call.first_token_at
        self._seq += 1
        self.requests.append(
            (
                self._seq,
                now,
                call.request_id,
                model,
                call.stream,
                records,
                provider,
                call.status or 499,
                call.failover,
                elapsed,
                None if first is None else first - call.started,
            )
        )
        series = self.series[provider]
        series.counts[series.i] += 1
        series.hist[bisect_right(BOUNDS, elapsed)] += 1
        if len(records) > 1:  # a move from one provider to the next counts for the first
            for before, after in itertools.pairwise(records):
                if after.provider is not before.provider:
                    moved = self.series[before.provider.name]
                    moved.failovers[moved.m] += 1
        if self._watchers:
            self._wake.set()

    def _roll(self, now: float) -> None:
        second = int(now)
        self._second = (float(second), float(second + 1))
        for series in self.series.values():
            series.roll(second // STEP, second // 60)

    def transition(self, provider: str, old: State, new: State, reason: str) -> None:
        """Keep a breaker state change (called by the breaker's listener)."""
        self._tseq += 1
        self.transitions.append((self._tseq, self._clock(), provider, old.value, new.value, reason))
        if self._watchers:
            self._wake.set()

    # -- reading ----------------------------------------------------------------------

    def _request_json(self, e: _Entry) -> dict[str, Any]:
        seq, at, request_id, model, stream, chain, provider, status, failover, latency, ttft = e
        return {
            "seq": seq,
            "time": _iso(at),
            "request_id": request_id,
            "model": model,
            "stream": stream,
            "chain": [{"provider": r.provider.name, "outcome": r.outcome} for r in chain],
            "provider": provider,
            "status": status,
            "failover": failover,
            "latency_ms": _ms(latency),
            "ttft_ms": _ms(ttft),
        }

    @staticmethod
    def _transition_json(t: tuple[int, float, str, str, str, str]) -> dict[str, Any]:
        seq, at, provider, old, new, reason = t
        return {
            "seq": seq,
            "time": _iso(at),
            "provider": provider,
            "from": old,
            "to": new,
            "reason": reason,
        }

    def _providers_json(self) -> list[dict[str, Any]]:
        last = next((e[6] for e in reversed(self.requests) if e[6] != NONE), None)
        out = []
        for p in self.providers:
            report = provider_report(p)
            report["open_until"] = report.pop("reopens_at")
            cause = p.breaker.cause
            closed = report["state"] == State.CLOSED
            report["reason"] = None if closed else str(cause or "failures")
            report["summary"] = provider_status(p)[1]
            report["served_last"] = p.name == last
            out.append(report)
        return out

    def _series_json(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "step_s": STEP,
            "minute_s": 60,
            "end": _iso(now),
            "providers": {name: s.render(now) for name, s in self.series.items()},
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows (``/status.json``), oldest entries first."""
        providers = self._providers_json()  # may record an open -> half-open transition
        return {
            "time": _iso(self._clock()),
            "providers": providers,
            "requests": [self._request_json(e) for e in self.requests],
            "transitions": [self._transition_json(t) for t in self.transitions],
            "series": self._series_json(),
        }

    # -- watchers ---------------------------------------------------------------------

    @contextlib.contextmanager
    def watch(self, request: web.Request) -> Iterator[_Watcher]:
        """Register a watcher for the duration of the block (503 past the cap)."""
        if len(self._watchers) >= MAX_WATCHERS:
            raise GatewayError(
                503,
                f"Too many status pages open (at most {MAX_WATCHERS}).",
                type_="server_error",
                code="too_many_watchers",
                retry_after=5,
            )
        watcher = _Watcher(request)
        self._watchers.add(watcher)
        if self._broadcaster is None or self._broadcaster.done():
            self._broadcaster = asyncio.create_task(self._broadcast(), name="status-broadcast")
        try:
            yield watcher
        finally:
            self._watchers.discard(watcher)

    @property
    def watchers(self) -> int:
        """Open ``/status/events`` streams."""
        return len(self._watchers)

    def _offer(self, blob: bytes | None) -> None:
        for watcher in list(self._watchers):
            try:
                watcher.queue.put_nowait(blob)
            except asyncio.QueueFull:  # it stopped reading: never buffer more for it
                self._watchers.discard(watcher)
                watcher.drop()

    async def _broadcast(self) -> None:
        """Send new requests and transitions (batched) and a provider tick each second,
        encoded once for every watcher; ends when the last watcher leaves."""
        loop = asyncio.get_running_loop()
        wake = self._wake
        sent, tsent = self._seq, self._tseq  # new watchers start from a snapshot
        next_tick = 0.0
        while self._watchers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_tick - loop.time())):
                    await wake.wait()
            wake.clear()
            parts = []
            if loop.time() >= next_tick:
                next_tick = loop.time() + TICK
                tick = {"providers": self._providers_json(), "series": self._series_json()}
                parts.append(_event("tick", tick))
            if self._tseq != tsent:
                new = [self._transition_json(t) for t in self.transitions if t[0] > tsent]
                tsent = self._tseq
                parts.append(_event("transitions", new))
            if self._seq != sent:
                batch = [self._request_json(e) for e in self.requests if e[0] > sent]
                sent = self._seq
                parts.append(_event("requests", batch))
            if parts:
                self._offer(b"".join(parts))
            await asyncio.sleep(BATCH)

    async def close(self) -> None:
        """End every watcher's stream and the broadcaster (at shutdown)."""
        self._offer(None)
        self._watchers.clear()
        task, self._broadcaster = self._broadcaster, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


RECORDER = web.AppKey("status", StatusRecorder)

# -- routes ---------------------------------------------------------------------------

_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def _page_headers(html: bytes) -> dict[str, str]:
    """Headers for the page: its inline script and style are allowed by hash, nothing
    else runs or loads, and no other site may frame it."""
    hashes = []
    for tag in (b"script", b"style"):
        for body in re.findall(rb"<" + tag + rb">(.*?)</" + tag + rb">", html, re.S):
            digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
            hashes.append((tag.decode(), f"'sha256-{digest}'"))
    scripts = " ".join(h for t, h in hashes if t == "script")
    styles = " ".join(h for t, h in hashes if t == "style")
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; script-src {scripts}; style-src {styles}; "
            "connect-src 'self'; img-src data:; frame-ancestors 'none'; "
            "form-action 'self'; base-uri 'none'"
        ),
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    }


async def _json(request: web.Request) -> web.Response:
    return web.Response(
        body=orjson.dumps(request.app[RECORDER].snapshot()),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def _events(request: web.Request) -> web.StreamResponse:
    recorder = request.app[RECORDER]
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    with recorder.watch(request) as watcher:
        try:
            async with asyncio.timeout(recorder.send_timeout):  # the first write too
                await resp.prepare(request)
                await resp.write(b"retry: 2000\n\n" + _event("snapshot", recorder.snapshot()))
            while True:
                async with asyncio.timeout(WATCH_IDLE):
                    blob = await watcher.queue.get()
                if blob is None:
                    break
                async with asyncio.timeout(recorder.send_timeout):
                    await resp.write(blob)
        except (ConnectionResetError, TimeoutError):
            watcher.drop()  # gone, or not reading: nothing more can be sent
    return resp


async def _session(request: web.Request) -> web.Response:
    """GET: 204 when the caller may see the status (the page asks before connecting).
    POST with the key as a bearer token: 204 and a session cookie, HttpOnly and
    SameSite=Strict, so the page's EventSource (which cannot send headers) is let in."""
    resp = web.Response(status=204, headers={"Cache-Control": "no-store"})
    if request.method == "POST":
        value, max_age = request.app[SESSIONS].issue()
        resp.set_cookie(
            SESSION_COOKIE,
            value,
            max_age=max_age,
            path="/status",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
    return resp


def add_routes(app: web.Application) -> None:
    """Register the status page's routes on ``app``."""
    html = importlib.resources.files("gateway").joinpath("static/status.html").read_bytes()
    headers = _page_headers(html)

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=html, content_type="text/html", charset="utf-8", headers=headers)

    app.router.add_get("/status", page)
    app.router.add_get("/status.json", _json)
    app.router.add_get("/status/events", _events)
    app.router.add_get("/status/session", _session)
    app.router.add_post("/status/session", _session)
