"""The cache in a real Redis (Debian's ``redis-server``, started here on a free loopback
port): its bounds, and two gateway processes sharing it while it is killed and restarted."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.auth import digest
from gateway.cache import Entry
from gateway.config import CacheSettings
from tests.conftest import chat, gateway_process, needs_redis_server, process_env

redis = pytest.importorskip("redis.asyncio", reason="pip install -e '.[test]' (redis)")
from gateway.cache_redis import PREFIX, RedisBackend  # noqa: E402 (needs redis)

pytestmark = needs_redis_server
CLIENT_KEY = "sk-gateway-client-0123456789"
USE = {"x-gateway-cache": "use", "Authorization": f"Bearer {CLIENT_KEY}"}


async def test_redis_keeps_the_same_bounds(redis_server):
    settings = CacheSettings(redis_url=redis_server.url, max_entries=3, max_bytes=1 << 20)
    backend = RedisBackend(settings)
    peek = redis.Redis.from_url(redis_server.url)
    try:
        for n in range(3):
            assert await backend.set(f"k{n}", Entry("json", b"x" * 100, "openai", 1.0), 60)
        assert (await backend.get("k0")).body == b"x" * 100  # k0 is now the most recent
        assert await backend.set("k3", Entry("json", b"y", "openai", 1.0), 60)
        assert await backend.get("k1") is None  # the least recently used went
        assert await peek.zcard(PREFIX + "lru") == 3
        sizes = [int(v) for v in (await peek.hgetall(PREFIX + "sizes")).values()]
        assert int(await peek.get(PREFIX + "bytes")) == sum(sizes)
        # The byte bound: entries of 1500 bytes, at most 4096 in all.
        await peek.flushdb()
        small = CacheSettings(redis_url=redis_server.url, max_entries=100, max_bytes=4096,
                              max_entry_bytes=2048)  # fmt: skip
        tight = RedisBackend(small)
        for n in range(6):
            assert await tight.set(f"b{n}", Entry("json", b"z" * 1500, "openai", 1.0), 60)
            assert 0 < int(await peek.get(PREFIX + "bytes")) <= 4096
        assert [n for n in range(6) if await tight.get(f"b{n}")] == [4, 5]
        assert await peek.zcard(PREFIX + "lru") == 2
        await tight.close()
        # A TTL is Redis's own.
        assert await backend.set("short", Entry("json", b"s", "openai", 1.0), 0.05)
        await asyncio.sleep(0.2)
        assert await backend.get("short") is None
    finally:
        await backend.close()
        await peek.aclose()


async def _post(
    session: aiohttp.ClientSession, base: str, body: dict[str, Any]
) -> tuple[int, str, bytes]:
    async with session.post(f"{base}/v1/chat/completions", json=body, headers=USE) as resp:
        return resp.status, resp.headers.get("x-gateway-cache", ""), await resp.read()


async def _get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, headers=USE) as resp:
        return await (resp.json() if resp.content_type == "application/json" else resp.text())


def _body(n: int | str, stream: bool = False) -> dict[str, Any]:
    return chat(stream=stream, temperature=0, user=f"user-{n}")


async def test_two_gateways_share_redis_and_survive_its_death(
    redis_server, upstreams, unused_tcp_port_factory, tmp_path
):
    up = await upstreams("openai")
    config = tmp_path / "gateway.toml"
    config.write_text("[cache]\nredis_retry = 0.2\n")
    env = process_env(
        OPENAI_BASE_URL=up.url,
        OPENAI_API_KEY="sk-upstream-0123456789",
        GATEWAY_API_KEYS=CLIENT_KEY,
        GATEWAY_CONFIG=str(config),
        REDIS_URL=redis_server.url,
    )
    ports = unused_tcp_port_factory(), unused_tcp_port_factory()
    peek = redis.Redis.from_url(redis_server.url)
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        gateway_process(ports[0], env) as gw_a,
        gateway_process(ports[1], env) as gw_b,
        aiohttp.ClientSession(timeout=timeout) as session,
    ):
        a, b = gw_a.base, gw_b.base
        # Shared: what one gateway stored, the other replays byte for byte.
        status, cache, first = await _post(session, a, _body(0))
        assert (status, cache) == (200, "miss")
        status, cache, again = await _post(session, b, _body(0))
        assert (status, cache) == (200, "hit") and again == first
        _, cache, streamed = await _post(session, b, _body("s", stream=True))
        assert cache == "miss"
        _, cache, replayed = await _post(session, a, _body("s", stream=True))
        assert cache == "hit" and replayed == streamed
        assert len(up.requests) == 2
        # Stored keys and values hold neither the client's key nor its digest.
        keys = await peek.keys("*")  # the provider state shared by the two is there too
        assert any(k.startswith(PREFIX.encode()) for k in keys)
        for k in keys:
            stored = k + (await peek.get(k) if await peek.type(k) == b"string" else b"")
            for secret in (CLIENT_KEY, digest(CLIENT_KEY)):
                assert secret.encode() not in stored

        # Killed mid-run: every request is still answered (upstream, as a miss).
        done: list[int] = []
        killed_after: list[int] = []

        async def load(worker: int) -> None:
            for n in range(8):  # 5 workers x 8 = 40 requests
                status, _, data = await _post(session, (a, b)[n % 2], _body(n % 4))
                assert status == 200, data
                done.append(status)

        async def kill_midway() -> None:
            deadline = time.monotonic() + 10
            while len(done) < 10:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            redis_server.kill()
            killed_after.append(len(done))

        await asyncio.gather(kill_midway(), *(load(w) for w in range(5)))
        assert len(done) == 40 and killed_after[0] < 40
        status, cache, _ = await _post(session, a, _body(0))
        assert (status, cache) == (200, "miss")  # it was stored, but Redis is gone
        ready = await _get(session, f"{a}/readyz")
        assert ready["status"] == "ready" and ready["cache"]["status"] == "unreachable"
        exposition = await _get(session, f"{a}/metrics")
        assert "gateway_cache_backend_up 0.0" in exposition
        assert 'gateway_cache_backend_errors_total{op="get"} 0.0' not in exposition

        # Restarted (empty): both gateways use it again by themselves.
        await redis_server.start()
        deadline = time.monotonic() + 10
        while (await _get(session, f"{a}/readyz"))["cache"]["status"] != "ok":
            assert time.monotonic() < deadline, "gateway A did not reconnect"
            await _post(session, a, _body("probe"))
            await asyncio.sleep(0.05)
        status, cache, stored = await _post(session, a, _body("after"))
        assert (status, cache) == (200, "miss")
        status, cache, again = await _post(session, b, _body("after"))
        assert (status, cache) == (200, "hit") and again == stored
        ready = await _get(session, f"{b}/readyz")
        assert ready["cache"] == {"backend": "redis", "status": "ok"}
        assert orjson.loads(again)["choices"][0]["message"]["content"] == up.text
    await peek.aclose()
