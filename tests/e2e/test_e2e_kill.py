"""The primary's server process is killed (SIGKILL): idle, mid-stream, then restarted."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.e2e.conftest import chat_answer, chat_stream, port_refuses

pytestmark = pytest.mark.real_upstream

LONG = {"max_tokens": 400, "extra_body": {"min_tokens": 400}}  # generation that outlasts a test


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
    received: list[str] = []
    finish = None
    async with gw.sdk() as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="gemma",
            messages=[{"role": "user", "content": "Tell a long story about the sea."}],
            stream=True,
            temperature=0.0,
            **LONG,
        )
        assert raw.headers["x-gateway-provider"] == "lmstudio"
        async with raw.parse() as stream:
            chunks = aiter(stream)
            while len([t for t in received if t]) < 3:
                chunk = await anext(chunks)
                for choice in chunk.choices:
                    received.append(choice.delta.content or "")
                    finish = choice.finish_reason or finish

            primary.kill()

            # After commit the gateway cannot fail over: it ends the stream with an error
            # event, which the SDK raises; the stream never ends cleanly.
            with pytest.raises(openai.APIError) as info:
                async for chunk in chunks:
                    for choice in chunk.choices:
                        received.append(choice.delta.content or "")
                        finish = choice.finish_reason or finish
        assert "".join(received).strip()  # the partial text reached the client
        assert finish is None
        assert isinstance(info.value.body, dict)
        assert info.value.body.get("code") == "stream_interrupted"
        assert "after the first token" in info.value.message

        # The cut counted against the primary; the next request goes to the fallback.
        headers, text, _, _ = await chat_answer(sdk)
        assert headers["x-gateway-provider"] == "ollama"
        assert text.strip()
    report = await gw.providers()
    assert report["lmstudio"]["consecutive_failures"] >= 1 or is_open(report)
