"""`python -m gateway --demo`: the newcomer's first run, as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import aiohttp
import pytest

from tests.conftest import chat, wait_ready


@pytest.fixture
def demo(unused_tcp_port):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI", "LMSTUDIO", "OLLAMA", "GATEWAY"))
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "--demo",
            "--host",
            "127.0.0.1",
            "--port",
            str(unused_tcp_port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    yield proc, f"http://127.0.0.1:{unused_tcp_port}"
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    proc.stdout.close()


async def test_demo_shows_failover_and_stops_cleanly(demo):
    proc, base = demo
    await wait_ready(base)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/v1/chat/completions", json=chat()) as r:
            assert r.status == 200
            assert r.headers["x-gateway-provider"] == "lmstudio"
            assert r.headers["x-gateway-failover"] == "true"
            body = await r.json()
        async with s.post(f"{base}/v1/chat/completions", json=chat(stream=True)) as r:
            text = await r.text()
            assert text.rstrip().endswith("data: [DONE]")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    log = proc.stdout.read()
    assert "OpenAI rate limit exceeded, failing over to LM Studio" in log
    assert "Using LM Studio (failover)" in log
    assert "demo-key" not in log
    assert "steady upstream" in body["choices"][0]["message"]["content"]
