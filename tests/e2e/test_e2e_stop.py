"""The primary is frozen with SIGSTOP (alive, port open, silent), then thawed with SIGCONT."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.e2e.conftest import chat_answer, chat_stream, port_refuses

pytestmark = pytest.mark.real_upstream


async def test_primary_frozen_then_thawed(primary, fallback, real_gateway):
    gw = await real_gateway(primary, fallback, defaults={"first_token_timeout": 2.0})
    async with gw.sdk() as sdk:
        timeouts = await gw.attempts("lmstudio", "timeout")
        primary.sigstop()
        assert not port_refuses(primary.port)  # the kernel still accepts connections

        # A stream waits first_token_timeout for a first token, then fails over; the
        # client sees only the fallback's answer.
        headers, text, finish = await chat_stream(sdk)
        assert headers["x-gateway-provider"] == "ollama"
        assert headers["x-gateway-failover"] == "true"
        assert headers["x-gateway-attempts"] == "2"
        assert text.strip()
        assert finish in ("stop", "length")
        assert await gw.attempts("lmstudio", "timeout") == timeouts + 1

        # A second one does the same and opens the breaker (fail_max 2; a timed-out probe
        # may have opened it first); from then on requests stop waiting on the primary.
        headers, text, finish = await chat_stream(sdk)
        assert headers["x-gateway-provider"] == "ollama"
        assert text.strip()
        await gw.wait_for(lambda r: r["lmstudio"]["state"] == "open", "the breaker to open")
        skipped = await gw.attempts("lmstudio", "breaker_open")
        headers, text, _, _ = await chat_answer(sdk)
        assert headers["x-gateway-provider"] == "ollama"
        assert text.strip()
        assert await gw.attempts("lmstudio", "breaker_open") == skipped + 1

        primary.sigcont()
        # Probes see it again; the half-open trial closes the breaker and traffic returns.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while True:
            headers, text, finish, _ = await chat_answer(sdk)
            if headers["x-gateway-provider"] == "lmstudio":
                break
            assert loop.time() < deadline, "the primary never took traffic back"
            await asyncio.sleep(0.2)
        assert text.strip()
        assert finish in ("stop", "length")
        report = await gw.providers()
        assert report["lmstudio"]["state"] == "closed"

        headers, text, finish = await chat_stream(sdk)
        assert headers["x-gateway-provider"] == "lmstudio"
        assert headers["x-gateway-failover"] == "false"
        assert text.strip()


async def test_frozen_while_idle_is_routed_around(primary, fallback, real_gateway):
    """SIGSTOP while idle: probes time out with nothing in flight, clients give up with no
    byte back; that evidence opens the breaker as `stalled`, which moves the requests still
    waiting on the primary to the fallback. A client that states its deadline is answered
    by the fallback within it from the first request on."""
    gw = await real_gateway(
        primary,
        fallback,
        defaults={"first_token_timeout": 30.0, "response_timeout": 30.0},
        # Quick to judge the frozen primary; the fallback keeps the suite's generous probe
        # timeout (llama-cpp-python answers its model list only between generations).
        providers={
            "lmstudio": {
                "probe_interval": 2.0,
                "probe_timeout": 1.0,
                "fail_max": 3,
                "stall_timeout": 2.0,
            }
        },
    )
    primary.sigstop()
    try:
        named = openai.AsyncOpenAI(
            base_url=gw.base_url,
            api_key="k",
            max_retries=0,
            timeout=20.0,
            default_headers={"x-gateway-timeout": "16"},
        )
        async with named as sdk:
            headers, text, _, _ = await chat_answer(sdk)
        assert headers["x-gateway-provider"] == "ollama"  # within its own 16 s
        assert text.strip()

        outcomes: list[str] = []
        async with openai.AsyncOpenAI(
            base_url=gw.base_url, api_key="k", max_retries=0, timeout=4.0
        ) as sdk:
            for _ in range(10):  # bounded: at most 10 requests of at most 4 s
                try:
                    headers, text, _, _ = await chat_answer(sdk)
                    outcomes.append(headers["x-gateway-provider"])
                except openai.APITimeoutError:
                    outcomes.append("gave up")
                if outcomes[-2:] == ["ollama", "ollama"]:
                    break
        assert outcomes[-2:] == ["ollama", "ollama"], outcomes
        report = await gw.providers()
        assert report["lmstudio"]["state"] == "open"
        assert await gw.attempts("lmstudio", "breaker_open") >= 1
    finally:
        primary.sigcont()
