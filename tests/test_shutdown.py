"""SIGTERM: stop accepting, let streams finish within the grace, end the rest cleanly."""

from __future__ import annotations

import asyncio

import aiohttp

from tests import fake_upstream as fu
from tests.conftest import chat, gateway_process, process_env
from tests.test_streaming import read_stream


async def refuses_new_connections(base):
    """True once a fresh connection is refused (polled for up to 1 s, while streams run)."""
    for _ in range(100):
        try:
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
                s.get(f"{base}/healthz"),
            ):
                pass
        except aiohttp.ClientConnectionError:
            return True
        await asyncio.sleep(0.01)
    return False


async def test_sigterm_drains_streams(upstreams, unused_tcp_port):
    a = await upstreams("a")
    a.then(fu.stream(tokens=6, chunk_delay=0.1), fu.stream(tokens=200, chunk_delay=0.1))
    env = process_env(OPENAI_BASE_URL=a.url, OPENAI_API_KEY="sk-x", GATEWAY_SHUTDOWN_GRACE="1.5")
    async with gateway_process(unused_tcp_port, env) as gw:
        base = gw.base
        async with aiohttp.ClientSession() as s:
            short = await s.post(f"{base}/v1/chat/completions", json=chat(stream=True))
            long = await s.post(f"{base}/v1/chat/completions", json=chat(stream=True))
            assert short.status == long.status == 200  # both committed
            gw.terminate()
            (short_data, short_done), (long_data, long_done), refused = await asyncio.gather(
                read_stream(short), read_stream(long), refuses_new_connections(base)
            )
        assert short_done and "error" not in short_data[-1]  # finished within the grace
        assert not long_done
        assert long_data[-1]["error"]["code"] == "shutting_down"
        assert refused  # no new connections after SIGTERM
        assert await gw.stop() == 0
        assert "ending 1 request(s) still in flight" in gw.log
        probes = a.probes
        await asyncio.sleep(0.2)
        assert a.probes == probes
