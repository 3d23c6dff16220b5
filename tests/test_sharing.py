"""Three gateway replicas share what they learn about providers through a real Redis
(Debian's ``redis-server`` on a free loopback port): a breaker one of them opens, one
half-open trial for all, a spent rate limit, and limits counted across them; Redis killed
and restarted."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import fake_upstream as fu
from tests.conftest import (
    PROVIDER_KEY,
    RedisServer,
    chat,
    gateway_process,
    needs_redis_server,
    process_env,
)

pytest.importorskip("redis.asyncio", reason="pip install -e '.[test]' (redis)")
pytestmark = needs_redis_server
TIMEOUT = aiohttp.ClientTimeout(total=15)


@contextlib.asynccontextmanager
async def replicas(
    n: int, env: dict[str, str], ports: Callable[[], int]
) -> AsyncIterator[list[str]]:
    """``n`` gateway processes with ``env``, started together; yields their base URLs."""
    async with contextlib.AsyncExitStack() as stack:
        started = await asyncio.gather(
            *(stack.enter_async_context(gateway_process(ports(), env)) for _ in range(n))
        )
        yield [gw.base for gw in started]


async def post(session: aiohttp.ClientSession, base: str, model: str = "gpt-4o-mini") -> Any:
    """One chat request: (status, answering provider, chain of attempts from the header)."""
    async with session.post(f"{base}/v1/chat/completions", json=chat(model=model)) as resp:
        await resp.read()
        return resp.status, resp.headers["x-gateway-provider"]


async def report(session: aiohttp.ClientSession, base: str, provider: str) -> dict[str, Any]:
    """``provider``'s entry in one replica's /admin/providers."""
    async with session.get(f"{base}/admin/providers") as resp:
        data = await resp.json()
    return next(p for p in data["providers"] if p["name"] == provider)


async def state(session: aiohttp.ClientSession, base: str, provider: str) -> str:
    return (await report(session, base, provider))["state"]


async def until(check: Callable[[], Awaitable[bool]], what: str, within: float = 10.0) -> None:
    """Poll ``check`` until it holds (bounded)."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def all_in(session: aiohttp.ClientSession, bases: list[str], provider: str, want: str):
    async def check() -> bool:
        states = await asyncio.gather(*(state(session, b, provider) for b in bases))
        return all(s == want for s in states)

    await until(check, f"{provider} not {want} everywhere")


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return str(path)


async def test_replicas_share_openings_one_trial_and_survive_redis(
    redis_server: RedisServer, upstreams, unused_tcp_port_factory, tmp_path
):
    primary, fallback = await upstreams("openai"), await upstreams("lmstudio")
    toml = """
[sharing]
redis_retry = 0.2
[defaults]
probe_interval = 60    # one probe at start-up, by one replica; none during the test
max_retries = 0
[providers.openai]
fail_max = 1
reset_timeout = 1
"""
    env = process_env(
        OPENAI_BASE_URL=primary.url,
        OPENAI_API_KEY=PROVIDER_KEY,
        LMSTUDIO_BASE_URL=fallback.url,
        LMSTUDIO_MODEL="local-model",
        GATEWAY_CONFIG=config(tmp_path, toml),
        REDIS_URL=redis_server.url,
    )
    async with (
        replicas(3, env, unused_tcp_port_factory) as (a, b, c),
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):
        # Three replicas, one probe between them: the others apply its published result
        # (waited for: a replica may still be starting its first round of probes).
        async def probed() -> bool:
            found = await asyncio.gather(*(report(s, base, "openai") for base in (a, b, c)))
            return all(r["last_probe"] is not None for r in found)

        await until(probed, "the first probe's result in every replica")
        assert primary.probes == 1
        # A sees the primary fail once (fail_max = 1) and opens its breaker.
        primary.then(fu.server_error(502))
        assert await post(s, a) == (200, "lmstudio")
        await all_in(s, [b, c], "openai", "open")
        # B and C skip it without touching the network.
        connections, sent = primary.connections, len(primary.requests)
        answers = await asyncio.gather(*(post(s, base) for base in (b, c) * 5))
        assert answers == [(200, "lmstudio")] * 10
        assert (primary.connections, len(primary.requests)) == (connections, sent)

        # Half-open everywhere (reset_timeout = 1): 30 requests over the three replicas
        # send exactly one trial; it is held until the others have been answered.
        await all_in(s, [a, b, c], "openai", "half_open")
        gate = asyncio.Event()
        primary.then(fu.ok(gate=gate))
        tasks = [asyncio.create_task(post(s, base)) for base in (a, b, c) * 10]
        deadline = time.monotonic() + 10
        while sum(t.done() for t in tasks) < 29:
            assert time.monotonic() < deadline, "the 29 non-trial requests were not answered"
            await asyncio.sleep(0.02)
        assert len(primary.requests) == sent + 1  # the one trial, held by the gate
        gate.set()
        answers = await asyncio.gather(*tasks)
        assert sorted(answers).count((200, "lmstudio")) == 29
        assert answers.count((200, "openai")) == 1
        assert len(primary.requests) == sent + 1
        await all_in(s, [a, b, c], "openai", "closed")  # the trial's success closed all

        # Redis killed under traffic: no request fails, each replica says so.
        done: list[tuple[int, str]] = []

        async def load() -> None:
            for n in range(12):
                done.append(await post(s, (a, b, c)[n % 3]))

        async def kill_midway() -> None:
            await until(lambda: asyncio.sleep(0, len(done) >= 6), "no traffic")
            redis_server.kill()

        await asyncio.gather(kill_midway(), *(load() for _ in range(4)))
        assert done == [(200, "openai")] * 48
        for base in (a, b, c):
            async with s.get(f"{base}/readyz") as resp:
                ready = await resp.json()
            assert resp.status == 200 and ready["status"] == "ready"
            await post(s, base)  # a command to notice with, if the listener has not yet
            async with s.get(f"{base}/readyz") as resp:
                assert (await resp.json())["sharing"]["status"] == "unreachable"
            async with s.get(f"{base}/metrics") as resp:
                assert "gateway_shared_state_up 0.0" in await resp.text()

        # Restarted (empty): the replicas rejoin by themselves, and sharing resumes.
        await redis_server.start()

        async def rejoined() -> bool:
            for base in (a, b, c):
                async with s.get(f"{base}/readyz") as resp:
                    if (await resp.json())["sharing"]["status"] != "ok":
                        return False
            return True

        await until(rejoined, "the replicas did not rejoin Redis")
        # What B learns from the primary's x-ratelimit-* headers (its request budget is
        # spent for 30 s), A and C learn too, and none of them sends it anything more.
        spent = {
            "x-ratelimit-limit-requests": "100",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "30s",
        }
        primary.then(fu.ok(headers=spent))
        assert await post(s, b) == (200, "openai")

        async def learned() -> bool:
            for base in (a, c):
                async with s.get(f"{base}/admin/providers") as resp:
                    budget = (await resp.json())["providers"][0]["budget"]
                if not budget or budget["requests"]["remaining"] != 0:
                    return False
            return True

        await until(learned, "the spent budget did not reach the other replicas")
        sent = len(primary.requests)
        answers = await asyncio.gather(*(post(s, base) for base in (a, c) * 3))
        assert answers == [(200, "lmstudio")] * 6
        assert len(primary.requests) == sent


async def test_limits_hold_across_replicas(
    redis_server: RedisServer, upstreams, unused_tcp_port_factory, tmp_path
):
    limited, paced, fallback = [await upstreams(n) for n in ("limited", "paced", "lmstudio")]
    limited.default = fu.ok(delay=0.2)  # long enough for 50 clients to pile up
    paced.rpm = 900  # its own limit, above the gateway's budget: it refuses past it
    toml = f"""
[gateway]
failover_order = ["limited", "paced", "lmstudio"]
[defaults]
probe_interval = 60
max_retries = 0
[providers.limited]
base_url = "{limited.url}"
max_concurrency = 5
max_queue_wait = 1
[providers.paced]
base_url = "{paced.url}"
rpm = 600                  # 10 a second, 10 at once: across the three replicas
max_queue_wait = 0.3
"""
    env = process_env(
        LMSTUDIO_BASE_URL=fallback.url,
        LMSTUDIO_MODEL="local-model",
        GATEWAY_CONFIG=config(tmp_path, toml),
        REDIS_URL=redis_server.url,
    )
    async with (
        replicas(3, env, unused_tcp_port_factory) as bases,
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):

        async def shared() -> bool:
            for base in bases:
                async with s.get(f"{base}/readyz") as resp:
                    if (await resp.json())["sharing"]["status"] != "ok":
                        return False
            return True

        await until(shared, "the replicas did not join Redis")
        # A burst of 30 over three replicas: the budget of 10 at once (and 10 a second)
        # holds for all of them, so the provider never refuses; the rest overflow.
        answers = await asyncio.gather(*(post(s, bases[n % 3], "paced/x") for n in range(30)))
        assert all(status == 200 for status, _ in answers)
        assert paced.refused == 0
        assert sum(who == "paced" for _, who in answers) == len(paced.requests) >= 10

        # 50 clients at once over three replicas: never more than 5 at the provider.
        limited.peak, before = 0, len(limited.requests)  # some came as overflow above
        answers = await asyncio.gather(*(post(s, bases[n % 3], "limited/x") for n in range(50)))
        assert all(status == 200 for status, _ in answers)
        assert limited.peak == 5
        assert sum(who == "limited" for _, who in answers) == len(limited.requests) - before >= 5
        assert paced.refused == 0  # where those that overflowed went next
