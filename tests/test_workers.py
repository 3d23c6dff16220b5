"""``--workers 2``: two processes on one port under a supervisor, sharing provider state
through its hub (no Redis), with one ``/metrics`` for both; a killed worker comes back."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import aiohttp

from tests import fake_upstream as fu
from tests.conftest import PROVIDER_KEY, chat, gateway_process, process_env

SERVING = re.compile(r"worker (\d) of 2 serving \(pid (\d+)\)")
SERVED_BY = re.compile(r"INFO gateway: request id=\S+ .* worker=(\d+)$")
REQUESTS = re.compile(r"^gateway_requests_total\{[^}]*\} ([\d.]+)$", re.M)


async def lines_matching(log: Path, pattern: str, count: int, within: float = 10.0) -> list[str]:
    """Wait (bounded) until the log has ``count`` lines containing ``pattern``."""
    deadline = time.monotonic() + within
    while True:
        text = await asyncio.to_thread(log.read_text)
        found = [ln for ln in text.splitlines() if pattern in ln]
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"fewer than {count} lines with {pattern!r}"
        await asyncio.sleep(0.05)


async def serving(log: Path, count: int) -> dict[int, int]:
    """Worker index -> pid, of the last ``count`` "serving" lines."""
    found = await lines_matching(log, "of 2 serving", count)
    return {int(m[1]): int(m[2]) for m in (SERVING.search(ln) for ln in found) if m}


async def burst(base: str, n: int) -> list[str]:
    """``n`` requests, each on a new connection (so that both workers get some)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        providers = []
        for _ in range(n):
            async with s.post(f"{base}/v1/chat/completions", json=chat()) as resp:
                await resp.read()
                assert resp.status == 200
                providers.append(resp.headers["x-gateway-provider"])
        return providers


async def served_total(base: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"{base}/metrics") as resp:
        text = await resp.text()
    return sum(float(v) for v in REQUESTS.findall(text)), text


async def test_two_workers_serve_share_and_come_back(upstreams, unused_tcp_port, tmp_path):
    primary, fallback = await upstreams("openai"), await upstreams("lmstudio")
    toml = tmp_path / "gateway.toml"
    toml.write_text(
        "[defaults]\nprobe_interval = 60\nmax_retries = 0\n"
        "[providers.openai]\nfail_max = 1\nreset_timeout = 60\n"
    )
    env = process_env(
        OPENAI_BASE_URL=primary.url,
        OPENAI_API_KEY=PROVIDER_KEY,
        LMSTUDIO_BASE_URL=fallback.url,
        LMSTUDIO_MODEL="local-model",
        GATEWAY_CONFIG=str(toml),
    )
    log = tmp_path / "gateway.log"
    async with gateway_process(unused_tcp_port, env, "--workers", "2", output=log) as gw:
        pids = await serving(log, 2)
        assert sorted(pids) == [0, 1]
        # Both serve: new connections are spread over the two by the kernel.
        assert await burst(gw.base, 40) == ["openai"] * 40
        served = await lines_matching(log, "INFO gateway: request id=", 40)
        assert {int(SERVED_BY.search(ln)[1]) for ln in served} == set(pids.values())
        # Whichever answers, /metrics sums the requests of both.
        total, _ = await served_total(gw.base)
        assert total == 40
        # One probe for the two, one failure for the two: the breaker one of them opens
        # opens in the other as well (its log says so), and neither sends there again.
        assert primary.probes == 1
        primary.then(fu.server_error(502))
        assert await burst(gw.base, 1) == ["lmstudio"]
        await lines_matching(log, "OpenAI circuit breaker closed -> open", 2)
        sent = len(primary.requests)
        assert await burst(gw.base, 20) == ["lmstudio"] * 20
        assert len(primary.requests) == sent

        # A killed worker is started again, and learns what the other knows. (Its lines are
        # written first: SIGKILL would take a line still waiting for the next loop turn.)
        await lines_matching(log, "INFO gateway: request id=", 61)
        os.kill(pids[0], signal.SIGKILL)
        await lines_matching(log, f"worker 0 (pid {pids[0]}) exited with signal SIGKILL", 1)
        again = (await serving(log, 3))[0]
        assert again not in pids.values()
        await lines_matching(log, "OpenAI circuit breaker closed -> open", 3)
        answered = 61  # so far: 40, 1 and 20
        deadline = time.monotonic() + 10
        while again not in {int(SERVED_BY.search(ln)[1]) for ln in served}:
            assert time.monotonic() < deadline, "the new worker served nothing"
            assert await burst(gw.base, 10) == ["lmstudio"] * 10
            answered += 10
            served = await lines_matching(log, "INFO gateway: request id=", answered)
        assert len(primary.requests) == sent
        total, text = await served_total(gw.base)
        assert total == answered  # the dead worker's requests still count
        assert "gateway_worker_restarts_total 1.0" in text
        assert primary.probes == 1

        # SIGTERM drains both and the supervisor exits cleanly.
        assert await gw.stop() == 0
    for pid in (again, pids[1]):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"worker {pid} outlived its supervisor")
