"""The rules of shared provider state (breakers.shared), on an in-memory bus between
breakers of one test process; the workers' hub on a real Unix socket; the settings."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from breakers import Cause, ProviderBreaker, State
from breakers.shared import Sharing
from gateway.config import ConfigError, load_settings
from gateway.hub import Hub, HubBus
from tests.fake_upstream import wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MemoryBus:
    """Every process's messages reach every process (its own included), in order."""

    def __init__(self, world: list[MemoryBus], leases: dict[str, tuple[str, float]], clock: Clock):
        self.world, self.leases, self.clock = world, leases, clock
        self.replica = f"p{len(world)}"
        self.sharing: Sharing | None = None
        self.down = False
        world.append(self)

    def publish(self, message: dict[str, Any]) -> None:
        if self.down:
            return
        for bus in self.world:
            if bus.sharing is not None and not bus.down:
                bus.sharing.receive(message)

    async def claim(self, key: str, token: str, ttl: float) -> float | None:
        if self.down:
            return None
        held = self.leases.get(key)
        if held is not None and held[1] > self.clock():
            return held[1] - self.clock()
        self.leases[key] = (token, self.clock() + ttl)
        return 0.0

    def release(self, key: str, token: str) -> None:
        if self.leases.get(key, ("",))[0] == token:
            del self.leases[key]


def processes(n: int, fail_max: int = 3) -> tuple[list[ProviderBreaker], list[Any], Clock]:
    """``n`` processes, each with a breaker for provider "p", sharing it."""
    clock = Clock()
    world: list[MemoryBus] = []
    leases: dict[str, tuple[str, float]] = {}
    breakers, shares = [], []
    for _ in range(n):
        bus = MemoryBus(world, leases, clock)
        bus.sharing = Sharing(bus)
        breaker = ProviderBreaker("p", fail_max, 30.0, clock=clock)
        breakers.append(breaker)
        shares.append(bus.sharing.add("p", breaker, trial_ttl=60.0))
    return breakers, shares, clock


async def test_an_opening_and_its_cause_reach_every_process():
    (a, b, c), _, clock = processes(3)
    permit = b.try_acquire()  # admitted before the opening: its verdict will not count
    a.record_failure(a.try_acquire(), open_for=20.0, cause=Cause("rate_limited", "429"))
    for breaker in (b, c):
        assert breaker.state is State.OPEN
        assert str(breaker.cause) == "rate_limited (429)"
        assert breaker.firm and round(breaker.open_remaining()) == 20
    b.record_success(permit)  # a stale permit: moves nothing, here or elsewhere
    assert a.state is b.state is c.state is State.OPEN
    clock.now += 21
    assert a.state is b.state is c.state is State.HALF_OPEN


async def test_failures_count_across_processes_and_a_success_resets_them():
    (a, b, c), _, _ = processes(3, fail_max=3)
    a.record_failure(a.try_acquire(), cause=Cause("server_error"))
    b.record_failure(b.try_acquire(), cause=Cause("server_error"))
    assert a.fail_counter == b.fail_counter == c.fail_counter == 2
    c.record_success(c.try_acquire())
    assert a.fail_counter == b.fail_counter == c.fail_counter == 0
    for breaker in (a, b, c):
        breaker.record_failure(breaker.try_acquire(), cause=Cause("server_error"))
    assert a.state is b.state is c.state is State.OPEN  # three failures, one in each


async def test_one_trial_across_processes_and_its_verdict_for_all():
    (a, b, c), shares, clock = processes(3, fail_max=1)
    a.record_failure(a.try_acquire(), cause=Cause("unreachable"))
    clock.now += 31  # half-open everywhere
    trials = []
    for breaker, share in zip((a, b, c), shares, strict=True):
        permit = breaker.try_acquire()
        assert permit is not None and permit.trial  # each would try, alone
        if await share.claim_trial():
            trials.append((breaker, permit))
        else:
            breaker.release(permit)
    assert len(trials) == 1
    (winner, permit), others = trials[0], [x for x in (a, b, c) if x is not trials[0][0]]
    for breaker in others:
        assert breaker.try_acquire() is None  # the trial runs elsewhere
    winner.record_success(permit)
    await asyncio.sleep(0)  # the lease goes back after the verdict
    assert a.state is b.state is c.state is State.CLOSED


async def test_a_trial_without_verdict_frees_the_others_and_a_failed_one_reopens_all():
    (a, b), shares, clock = processes(2, fail_max=1)
    a.record_failure(a.try_acquire(), cause=Cause("unreachable"))
    clock.now += 31
    permit = a.try_acquire()
    assert await shares[0].claim_trial()
    refused = b.try_acquire()
    assert not await shares[1].claim_trial()
    b.release(refused)
    assert b.try_acquire() is None
    a.release(permit)  # the client left: no verdict
    await asyncio.sleep(0)
    permit = b.try_acquire()
    assert permit is not None and permit.trial and await shares[1].claim_trial()
    b.record_failure(permit, cause=Cause("server_error"))
    assert a.state is b.state is State.OPEN


async def test_a_newcomer_hears_what_the_others_know_and_a_lost_bus_decides_alone():
    (a, b), shares, _ = processes(2)
    bus_b = shares[1].sharing.bus
    bus_b.down = True  # B is away while A opens
    a.record_failure(a.try_acquire(), open_for=10.0, cause=Cause("quota_exhausted", "billing"))
    assert b.state is State.CLOSED
    bus_b.down = False
    shares[1].sharing.joined()  # back: hello, and A answers with its open breaker
    assert b.state is State.OPEN and b.firm and b.cause == Cause("quota_exhausted", "billing")
    bus_b.down = True
    assert await shares[1].claim_trial()  # no bus: each process runs its own trial


@pytest.mark.parametrize(
    "message",
    [
        None,
        "text",
        {"r": "x", "t": "open", "p": "nope", "d": 5},  # a provider it does not have
        {"r": "x", "t": "open", "p": "p", "d": "five"},
        {"r": "x", "t": "open", "p": "p", "d": -1},
        {"r": "x", "t": "open", "p": "p", "d": 5, "k": 7},
        {"r": "x", "t": "probe", "p": "p", "lat": 0.1, "m": "all"},
        {"r": "x", "t": "from-a-newer-version", "p": "p"},
    ],
)
async def test_unreadable_messages_are_refused_without_harm(message):
    (a,), shares, _ = processes(1)
    assert shares[0].sharing.receive(message) is False
    assert a.state is State.CLOSED


async def test_the_workers_hub_passes_messages_and_holds_leases(tmp_path):
    hub = Hub(str(tmp_path / "hub.sock"))
    await hub.start()
    assert oct(os.stat(hub.path).st_mode & 0o777) == "0o600"
    got: dict[str, list[Any]] = {"w0": [], "w1": []}

    class Recorder(Sharing):
        def receive(self, message: Any) -> bool:
            got[self.bus.replica].append(message)
            return True

    buses = [HubBus(hub.path, f"w{i}") for i in range(2)]
    for bus in buses:
        bus.start(Recorder(bus))
    try:
        await wait_until(lambda: all(b.up for b in buses) and got["w0"])  # w1's hello
        # A stranger's garbage ends nothing.
        _, writer = await asyncio.open_unix_connection(hub.path)
        writer.write(b"not json\n[1, 2]\n")
        await writer.drain()
        buses[0].publish({"r": "w0", "t": "fail", "p": "p"})
        await wait_until(lambda: any(m.get("t") == "fail" for m in got["w1"]))
        assert not any(m.get("t") == "fail" for m in got["w0"])  # not back to the sender
        assert await buses[0].claim("trial:p", "w0:1", 0.2) == 0
        assert 0 < await buses[1].claim("trial:p", "w1:1", 0.2) <= 0.2
        buses[1].release("trial:p", "w1:1")  # not its lease: nothing happens
        assert await buses[1].claim("trial:p", "w1:2", 0.2) > 0
        buses[0].release("trial:p", "w0:1")
        assert await buses[1].claim("trial:p", "w1:3", 0.2) == 0
        await asyncio.sleep(0.25)  # expired: anyone may take it
        assert await buses[0].claim("trial:p", "w0:2", 0.2) == 0
        writer.close()
    finally:
        for bus in buses:
            await bus.close()
        await hub.close()
    assert await buses[0].claim("trial:p", "w0:3", 1) is None  # no hub: decide alone


def test_workers_and_sharing_settings(tmp_path):
    base = {"LMSTUDIO_BASE_URL": "http://h:1", "OLLAMA_BASE_URL": ""}
    assert load_settings(base).workers == 1
    assert load_settings({**base, "GATEWAY_WORKERS": "auto"}).workers == len(
        os.sched_getaffinity(0)
    )
    for bad in ("0", "1.5", "lots", "257"):
        with pytest.raises(ConfigError, match=r"^GATEWAY_WORKERS: must be auto or a whole"):
            load_settings({**base, "GATEWAY_WORKERS": bad})
    # One Redis for the cache and the shared state, unless told otherwise.
    assert load_settings(base).shared_redis is None
    settings = load_settings({**base, "REDIS_URL": "redis://r:6379/0"})
    assert settings.shared_redis == settings.cache.redis_url == "redis://r:6379/0"
    toml = tmp_path / "g.toml"
    toml.write_text('[cache]\nredis_url = "redis://c/0"\n[sharing]\nenabled = false\n')
    settings = load_settings({**base, "GATEWAY_CONFIG": str(toml)})
    assert settings.cache.redis_url == "redis://c/0" and settings.shared_redis is None
    toml.write_text('[sharing]\nredis_url = "http://nope"\n')
    with pytest.raises(ConfigError, match=r"^sharing.redis_url: must be a redis://"):
        load_settings({**base, "GATEWAY_CONFIG": str(toml)})
    toml.write_text("[sharing]\nredis_retry = 0\n")
    with pytest.raises(ConfigError, match=r"^sharing.redis_retry: must be positive"):
        load_settings({**base, "GATEWAY_CONFIG": str(toml)})
    toml.write_text("[sharing]\nredis = 1\n")
    with pytest.raises(ConfigError, match=r"^sharing.redis: unknown setting"):
        load_settings({**base, "GATEWAY_CONFIG": str(toml)})
