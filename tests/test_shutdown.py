"""SIGTERM: stop accepting, let streams finish within the grace, end the rest cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp

from tests import fake_upstream as fu
from tests.conftest import chat, wait_ready
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
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "OPENAI_BASE_URL": a.url,
        "OPENAI_API_KEY": "sk-x",
        "LMSTUDIO_BASE_URL": "",
        "OLLAMA_BASE_URL": "",
        "GATEWAY_SHUTDOWN_GRACE": "1.5",
    }
    port = unused_tcp_port
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once; the test reads it at the end)
        [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base)
        async with aiohttp.ClientSession() as s:
            short = await s.post(f"{base}/v1/chat/completions", json=chat(stream=True))
            long = await s.post(f"{base}/v1/chat/completions", json=chat(stream=True))
            assert short.status == long.status == 200  # both committed
            proc.send_signal(signal.SIGTERM)
            (short_data, short_done), (long_data, long_done), refused = await asyncio.gather(
                read_stream(short), read_stream(long), refuses_new_connections(base)
            )
        assert short_done and "error" not in short_data[-1]  # finished within the grace
        assert not long_done
        assert long_data[-1]["error"]["code"] == "shutting_down"
        assert refused  # no new connections after SIGTERM
        assert await asyncio.to_thread(proc.wait, 15) == 0
        log = proc.stdout.read()
        assert "ending 1 request(s) still in flight" in log
        probes = a.probes
        await asyncio.sleep(0.2)
        assert a.probes == probes
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
