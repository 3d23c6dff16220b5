"""The primary's server process is killed (SIGKILL): idle, mid-stream, then restarted."""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.conftest import chat_answer, chat_stream, port_refuses, stream_with_fault

pytestmark = pytest.mark.real_upstream


def is_open(report):
    return report["lmstudio"]["state"] == "open"


async def answered_by_primary(sdk, ceiling=60.0):
    """Send requests until the primary answers one (bounded); its (headers, text, finish).

    Usually the first request does; on a loaded machine a probe can still time out while
    the restarted server warms up and send the breaker back to open for a moment.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ceiling
    while True:
        headers, text, finish, _ = await chat_answer(sdk)
        if headers["x-gateway-provider"] == "lmstudio":
            return headers, text, finish
        assert loop.time() < deadline, "the primary never took traffic back"
        await asyncio.sleep(0.2)


async def test_primary_killed_while_idle(primary, fallback, real_gateway):
    gw = await real_gateway(primary, fallback)
    async with gw.sdk() as sdk:
        headers, *_ = await chat_answer(sdk)
        assert headers["x-gateway-provider"] == "lmstudio"  # a pooled connection exists now

        primary.kill()
        assert port_refuses(primary.port)

        headers, text, finish, _ = await chat_answer(sdk)
        assert headers["x-gateway-provider"] == "ollama"
        assert headers["x-gateway-failover"] == "true"
        assert text.strip()
        assert finish in ("stop", "length")

        # The background probe sees the dead port and opens the breaker (fail_max 2: the
        # failed request plus one failed probe).
        report = await gw.wait_for(is_open, "the primary's breaker to open")
        assert report["lmstudio"]["last_probe"]["error"]
        assert report["ollama"]["state"] == "closed"

        # From now on requests skip the primary without touching the network: a connection
        # to the dead port would be refused and recorded as "unreachable"; none is.
        refused = await gw.attempts("lmstudio", "unreachable")
        skipped = await gw.attempts("lmstudio", "breaker_open")
        streamed = await chat_stream(sdk)
        answered = await chat_answer(sdk)
        for headers, text, finish, *_ in (streamed, answered):
            assert headers["x-gateway-provider"] == "ollama"
            assert headers["x-gateway-attempts"] == "2"
            assert text.strip()
            assert finish in ("stop", "length")
        assert await gw.attempts("lmstudio", "unreachable") == refused
        assert await gw.attempts("lmstudio", "breaker_open") == skipped + 2
        assert port_refuses(primary.port)
    readyz = await gw.client.get("/readyz")
    assert readyz.status == 200  # the fallback is still usable


async def test_primary_restarted_takes_traffic_back(primary, fallback, real_gateway):
    gw = await real_gateway(primary, fallback)
    primary.kill()
    await gw.wait_for(is_open, "the primary's breaker to open")
    async with gw.sdk() as sdk:
        headers, *_ = await chat_answer(sdk)
        assert headers["x-gateway-provider"] == "ollama"

        await primary.start_async()  # same port as before
        # A good probe moves the breaker to half-open; the next request is the trial, and
        # its success closes the breaker.
        await gw.wait_for(lambda r: not is_open(r), "a probe to see the primary again")
        headers, text, finish = await answered_by_primary(sdk)
        assert headers["x-gateway-failover"] == "false"
        assert headers["x-gateway-attempts"] == "1"
        assert text.strip()
        assert finish in ("stop", "length")
        report = await gw.providers()
        assert report["lmstudio"]["state"] == "closed"
        assert report["lmstudio"]["loaded_models"] == [primary.alias]

        headers, text, finish = await chat_stream(sdk)
        assert headers["x-gateway-provider"] == "lmstudio"
        assert text.strip()
        assert finish in ("stop", "length")


async def test_primary_killed_mid_stream(primary, fallback, real_gateway):
    gw = await real_gateway(primary, fallback)

    async def kill() -> None:
        primary.kill()

    async with gw.sdk() as sdk:
        # After commit the gateway cannot fail over: it ends the stream with an error
        # event, which the SDK raises; the stream never ends cleanly.
        received, finish, error = await stream_with_fault(sdk, kill)
        assert "".join(received).strip()  # the partial text reached the client
        assert finish is None
        assert error is not None and isinstance(error.body, dict)
        assert error.body.get("code") == "stream_interrupted"
        assert "after the first token" in error.message

        # The cut counted against the primary; the next request goes to the fallback.
        headers, text, _, _ = await chat_answer(sdk)
        assert headers["x-gateway-provider"] == "ollama"
        assert text.strip()
    report = await gw.providers()
    assert report["lmstudio"]["consecutive_failures"] >= 1 or is_open(report)
