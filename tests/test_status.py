"""The status page's data: ``/status.json`` and ``/status/events`` after scripted traffic,
the session cookie, what must never appear on it, and the bounds of its recorder."""

from __future__ import annotations

import asyncio
import contextlib
import tracemalloc
from types import SimpleNamespace
from typing import Any
from unittest import mock

import orjson

from breakers import State
from gateway import status
from gateway.auth import SESSION_COOKIE, AccessPolicy, Sessions, digest
from gateway.call import AttemptRecord, Call
from gateway.errors import Outcome
from gateway.sse import SSEParser
from gateway.status import MAX_REQUESTS, MAX_TRANSITIONS, WATCHER_QUEUE, StatusRecorder
from tests.conftest import PROVIDER_KEY, chat
from tests.fake_upstream import echo_key, ok, rate_limited, server_error

ADMIN_KEY = "gw-status-admin-key-0123456789"


class Events:
    """Reads named SSE events from a response, each wait bounded."""

    def __init__(self, resp: Any) -> None:
        self.resp = resp
        self.parser = SSEParser()
        self.pending: list[tuple[str, Any]] = []

    async def next(self, *names: str) -> Any:
        """The data of the next event named one of ``names`` (others are skipped)."""
        async with asyncio.timeout(5):
            while True:
                while self.pending:
                    name, data = self.pending.pop(0)
                    if name in names:
                        return data
                chunk = await self.resp.content.readany()
                assert chunk, "the stream ended"
                for event in self.parser.feed(chunk):
                    if event.data is not None:
                        self.pending.append((event.name, orjson.loads(event.data)))


def chains(snapshot: dict[str, Any]) -> list[list[tuple[str, str]]]:
    return [[(a["provider"], a["outcome"]) for a in r["chain"]] for r in snapshot["requests"]]


def provider(snapshot: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in snapshot["providers"] if p["name"] == name)


async def test_status_json_follows_a_failover_an_opening_and_a_recovery(upstreams, gateway):
    up1, up2 = await upstreams("openai"), await upstreams("lmstudio")
    up1.then(ok(), server_error(503), server_error(503))  # then the default: ok
    client = await gateway(up1, up2, fail_max=2, max_retries=0, reset_timeout=0.3)

    async def send(**kw: Any) -> str:
        resp = await client.post("/v1/chat/completions", json=chat(**kw))
        assert resp.status == 200
        await resp.read()
        return resp.headers["x-request-id"]

    ids = [await send(model="local-model")]  # a configured model keeps its name
    ids += [await send() for _ in range(3)]  # 503, 503 (opens), skipped
    opened = await (await client.get("/status.json")).json()
    openai = provider(opened, "openai")
    assert openai["state"] == "open"
    assert openai["reason"].startswith("server_error (503")
    assert openai["open_until"] is not None
    assert provider(opened, "lmstudio")["served_last"] is True
    assert [(t["provider"], t["from"], t["to"]) for t in opened["transitions"]] == [
        ("openai", "closed", "open")
    ]

    await asyncio.sleep(0.35)  # past reset_timeout: reading the state half-opens it
    half = await (await client.get("/status.json")).json()
    assert provider(half, "openai")["state"] == "half_open"
    ids.append(await send(stream=True))  # the trial: it closes the breaker

    final = await (await client.get("/status.json")).json()
    assert chains(final) == [
        [("openai", "ok")],
        [("openai", "server_error"), ("lmstudio", "ok")],
        [("openai", "server_error"), ("lmstudio", "ok")],
        [("openai", "breaker_open"), ("lmstudio", "ok")],
        [("openai", "ok")],
    ]
    rows = final["requests"]
    assert [r["request_id"] for r in rows] == ids
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["provider"] for r in rows] == ["openai", "lmstudio", "lmstudio", "lmstudio", "openai"]
    assert [r["failover"] for r in rows] == [False, True, True, True, False]
    assert [r["status"] for r in rows] == [200] * 5
    assert [r["model"] for r in rows] == ["local-model"] + ["other"] * 4
    assert [r["stream"] for r in rows] == [False] * 4 + [True]
    assert all(r["latency_ms"] > 0 for r in rows)
    assert [r["ttft_ms"] is not None for r in rows] == [False] * 4 + [True]

    transitions = final["transitions"]
    assert [(t["provider"], t["from"], t["to"]) for t in transitions] == [
        ("openai", "closed", "open"),
        ("openai", "open", "half_open"),
        ("openai", "half_open", "closed"),
    ]
    assert transitions[0]["reason"].startswith("server_error (503")
    assert transitions[2]["reason"] == "trial request succeeded"
    assert provider(final, "openai")["state"] == "closed"
    assert provider(final, "openai")["reason"] is None
    assert provider(final, "openai")["served_last"] is True

    series = final["series"]["providers"]
    assert set(series) == {"openai", "lmstudio", "none"}
    assert sum(series["openai"]["requests"]) == 2
    assert sum(series["lmstudio"]["requests"]) == 3
    assert sum(series["none"]["requests"]) == 0
    assert sum(series["openai"]["failovers"]) == 3  # two 503s and one skip moved on
    assert sum(series["lmstudio"]["failovers"]) == 0
    for name in ("openai", "lmstudio"):
        latencies = zip(series[name]["p50_ms"], series[name]["p95_ms"], strict=True)
        pairs = [(a, b) for a, b in latencies if a]
        assert pairs and all(0 < a <= b for a, b in pairs)


async def test_events_send_a_snapshot_then_each_failover_as_it_happens(upstreams, gateway):
    up1, up2 = await upstreams("openai"), await upstreams("lmstudio")
    up1.then(rate_limited(retry_after=30))
    client = await gateway(up1, up2, max_retries=0)
    resp = await client.get("/status/events")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    events = Events(resp)
    snapshot = await events.next("snapshot")
    assert snapshot["requests"] == [] and snapshot["transitions"] == []
    assert [p["state"] for p in snapshot["providers"]] == ["closed", "closed"]

    assert (await client.post("/v1/chat/completions", json=chat())).status == 200
    transitions = await events.next("transitions")
    assert [(t["provider"], t["from"], t["to"]) for t in transitions] == [
        ("openai", "closed", "open")
    ]
    assert transitions[0]["reason"].startswith("rate_limited (429")
    batch = await events.next("requests")
    assert [[(a["provider"], a["outcome"]) for a in r["chain"]] for r in batch] == [
        [("openai", "rate_limited"), ("lmstudio", "ok")]
    ]
    tick = await events.next("tick")
    assert provider(tick, "openai")["state"] == "open"
    assert sum(tick["series"]["providers"]["openai"]["failovers"]) == 1
    resp.close()


async def test_the_admin_key_buys_an_httponly_strict_session_cookie(upstreams, gateway):
    up = await upstreams("openai")
    client = await gateway(up, settings={"access": AccessPolicy(admin_key=digest(ADMIN_KEY))})
    jar = client.session.cookie_jar
    assert (await client.get("/status")).status == 200  # the page: a form, no data
    for path in ("/status.json", "/status/events", "/status/session"):
        assert (await client.get(path)).status == 401
    denied = await client.post("/status/session", headers={"Authorization": "Bearer wrong"})
    assert denied.status == 401

    resp = await client.post("/status/session", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert resp.status == 204
    cookie = resp.cookies[SESSION_COOKIE]
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/status"
    assert int(cookie["max-age"]) > 0
    assert ADMIN_KEY not in resp.headers["Set-Cookie"]
    jar.clear()
    session = {"Cookie": f"{SESSION_COOKIE}={cookie.value}"}

    assert (await client.get("/status/session", headers=session)).status == 204
    assert (await client.get("/status.json", headers=session)).status == 200
    events = await client.get("/status/events", headers=session)
    assert events.status == 200
    assert "providers" in await Events(events).next("snapshot")
    events.close()
    # The cookie opens the status page's GETs and nothing else: not a new session, not
    # /admin, not the API.
    assert (await client.post("/status/session", headers=session)).status == 401
    assert (await client.get("/admin/providers", headers=session)).status == 401
    forged = {"Cookie": f"{SESSION_COOKIE}=9999999999.{'0' * 64}"}
    assert (await client.get("/status.json", headers=forged)).status == 401


def test_sessions_are_signed_by_this_process_and_expire():
    sessions = Sessions()
    value, _ = sessions.issue()
    assert sessions.valid(value)
    expiry, mac = value.split(".")
    assert not sessions.valid(f"{int(expiry) + 1}.{mac}")  # a longer life is not for sale
    assert not sessions.valid(value[:-1] + ("0" if value[-1] != "0" else "1"))
    assert not Sessions().valid(value)  # another process (a restart) signs everyone out
    assert not Sessions(ttl=-1).valid(Sessions(ttl=-1).issue()[0])
    for junk in (None, "", ".", "abc.def", "-5." + mac):
        assert not sessions.valid(junk)


async def test_no_key_prompt_or_invented_model_name_reaches_the_status(upstreams, gateway):
    up1, up2 = await upstreams("openai"), await upstreams("lmstudio")
    up1.then(echo_key())  # a 401 that quotes the provider key back
    client = await gateway(up1, up2, fail_max=1)
    prompt = "the secret plan is hidden under the third stone"
    body = chat(model="sk-invented-by-a-client-42")
    body["messages"][0]["content"] = prompt
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.headers["x-gateway-provider"] == "lmstudio"

    snapshot = await (await client.get("/status.json")).read()
    events = await client.get("/status/events")
    streamed = orjson.dumps(await Events(events).next("snapshot"))
    events.close()
    page = await (await client.get("/status")).read()
    for text in (snapshot, streamed, page):
        for secret in (PROVIDER_KEY, prompt, "sk-invented-by-a-client-42", "third stone"):
            assert secret.encode() not in text
    data = orjson.loads(snapshot)
    assert data["requests"][0]["model"] == "other"
    assert data["transitions"][0]["reason"].startswith("auth_failed")


# -- the recorder alone ---------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fake_call(chain: list[str], outcomes: list[Outcome], request_id: str = "r") -> Call:
    """A finished call whose attempts went through ``chain`` (provider names)."""
    providers = {name: SimpleNamespace(name=name) for name in chain}
    call = Call("chat/completions", {}, b"", "m", False, request_id, 0.0)
    call.records = [
        AttemptRecord(providers[name], outcome, "")  # type: ignore[arg-type]
        for name, outcome in zip(chain, outcomes, strict=True)
    ]
    if outcomes[-1] is Outcome.OK:
        call.answered_by = providers[chain[-1]]  # type: ignore[assignment]
        call.first_route = providers[chain[0]]  # type: ignore[assignment]
        call.status = 200
    else:
        call.status = 503
    return call


def test_series_count_per_provider_and_forget_after_15_minutes():
    clock = Clock()
    rec = StatusRecorder(["a", "b"], clock=clock)
    for _ in range(100):
        rec.record(fake_call(["a"], [Outcome.OK]), "m", 0.010)
    clock.now += 60
    for _ in range(5):
        rec.record(fake_call(["a", "b"], [Outcome.RATE_LIMITED, Outcome.OK]), "m", 0.200)
    rec.record(fake_call(["a", "a", "b"], [Outcome.SERVER_ERROR] * 3), "m", 0.5)
    series = rec.snapshot()["series"]["providers"]
    assert sum(series["a"]["requests"]) == 100
    assert sum(series["b"]["requests"]) == 5
    assert sum(series["none"]["requests"]) == 1
    assert series["a"]["failovers"][-2:] == [0, 6]  # a retry on the same provider is no move
    assert series["b"]["failovers"] == [0] * status.MINUTES
    p50, p95 = series["a"]["p50_ms"][-2], series["a"]["p95_ms"][-2]
    assert 9 <= p50 <= 11 and 9 <= p95 <= 11  # within the histogram's 10 %
    assert 180 <= series["b"]["p50_ms"][-1] <= 220
    assert series["b"]["p50_ms"][:-1] == [None] * (status.MINUTES - 1)

    clock.now += 15 * 60  # the same slots again, 15 minutes on: what they held is gone
    later = rec.snapshot()["series"]["providers"]
    for s in later.values():
        assert sum(s["requests"]) == 0 and sum(s["failovers"]) == 0
        assert s["p50_ms"] == [None] * status.MINUTES
    assert len(later["a"]["requests"]) == status.POINTS
    rec.record(fake_call(["b"], [Outcome.OK]), "m", 0.001)
    reused = rec.snapshot()["series"]["providers"]["b"]
    assert sum(reused["requests"]) == 1
    assert 0.9 <= reused["p95_ms"][-1] <= 1.1  # the 200 ms of 15 minutes ago are forgotten


def test_ring_buffers_stay_bounded_under_a_long_loop():
    """Three simulated hours of traffic (30 000 requests, 3 000 transitions): the recorder
    keeps 50 requests, 20 transitions and fixed series, and its memory stops growing."""
    clock = Clock()
    rec = StatusRecorder(["a", "b", "c"], clock=clock)
    shapes = [
        (["a"], [Outcome.OK]),
        (["a", "b"], [Outcome.RATE_LIMITED, Outcome.OK]),
        (["a", "b", "c"], [Outcome.BREAKER_OPEN, Outcome.TIMEOUT, Outcome.OK]),
        (["a", "b", "c"], [Outcome.UNREACHABLE] * 3),
    ]
    states = [State.CLOSED, State.OPEN, State.HALF_OPEN]

    def traffic(n: int) -> None:
        for i in range(n):
            clock.now += 0.36  # 30 000 requests over three hours
            chain, outcomes = shapes[i % len(shapes)]
            rec.record(fake_call(chain, outcomes, "x" * 128), "m", (i % 997) / 100)
            if i % 10 == 0:
                rec.transition("abc"[i % 3], states[i % 3], states[(i + 1) % 3], "why " * 20)

    tracemalloc.start()
    try:
        traffic(3_000)
        first = tracemalloc.get_traced_memory()[0]
        traffic(27_000)
        growth = tracemalloc.get_traced_memory()[0] - first
    finally:
        tracemalloc.stop()
    assert len(rec.requests) == MAX_REQUESTS and rec.requests[-1][0] == 30_000
    assert len(rec.transitions) == MAX_TRANSITIONS
    assert set(rec.series) == {"a", "b", "c", "none"}
    for s in rec.series.values():
        assert len(s.counts) == status.POINTS and len(s.hists) == status.MINUTES
        assert all(len(h) == len(status.BOUNDS) + 1 for h in s.hists)
    assert growth < 64 * 1024, f"the recorder grew by {growth} bytes"
    size = len(orjson.dumps(rec.snapshot()))
    assert size < 64 * 1024, f"a snapshot is {size} bytes"


async def test_a_watcher_that_stops_reading_is_dropped(monkeypatch):
    """Its queue fills up to its bound, then its connection is cut; one that reads stays."""
    monkeypatch.setattr(status, "BATCH", 0.001)
    rec = StatusRecorder(["a"])
    stuck = mock.Mock()
    reader = mock.Mock()
    with rec.watch(stuck) as stuck_watcher, rec.watch(reader) as reading:
        assert rec.watchers == 2
        got = 0
        async with asyncio.timeout(10):
            while not stuck.transport.abort.called:
                rec.record(fake_call(["a"], [Outcome.OK]), "m", 0.01)
                await asyncio.sleep(0.002)
                while not reading.queue.empty():
                    reading.queue.get_nowait()
                    got += 1
        assert stuck_watcher.queue.qsize() == WATCHER_QUEUE  # never more than its bound
        assert rec.watchers == 1
        assert not reader.transport.abort.called
        assert got > WATCHER_QUEUE
    assert rec.watchers == 0
    await rec.close()


async def test_too_many_watchers_get_a_503(upstreams, gateway):
    up = await upstreams("openai")
    client = await gateway(up)
    rec = client.server.app[status.RECORDER]
    with contextlib.ExitStack() as stack:
        for _ in range(status.MAX_WATCHERS):
            stack.enter_context(rec.watch(mock.Mock()))
        resp = await client.get("/status/events")
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "too_many_watchers"
    resp = await client.get("/status/events")
    assert resp.status == 200
    resp.close()
