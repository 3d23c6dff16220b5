"""llama.cpp's own "dies mid-stream" fault: with ``--interrupt_requests True`` a request
that arrives while a stream runs cuts that stream off (a bare ``data: [DONE]``, no
``finish_reason``, no end of the chunked body).

The server's lock is taken by every endpoint, the model list included, so a plain
``GET /v1/models`` is enough to cut a stream. The gateway's own probes of this server
would do the same, so they are slowed to one at start-up.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.e2e.conftest import chat_stream, direct_stream, read_events, stream_with_fault

pytestmark = pytest.mark.real_upstream

QUIET_PROBES = {"lmstudio": {"probe_interval": 3600.0}}
# A prompt long enough that reading it takes the server a while: the window in which the
# gateway's request holds the model but has produced no token yet.
SLOW_PROMPT = [
    {"role": "user", "content": "The sea is wide and deep. " * 12 + "Say one word about it."}
]


def finish_reasons(payloads):
    found = []
    for data in payloads:
        if data != b"[DONE]":
            found += [c.get("finish_reason") for c in json.loads(data)["choices"]]
    return [f for f in found if f]


async def cut(direct, server):
    """Cut the stream that ``server`` is generating (returns once the server has)."""
    async with direct.get(f"{server.base_url}/v1/models") as resp:
        assert resp.status == 200


async def test_cut_before_first_token_fails_over_invisibly(flaky, fallback, real_gateway, direct):
    gw = await real_gateway(
        flaky, fallback, providers=QUIET_PROBES, defaults={"first_token_timeout": 20.0}
    )
    bad = await gw.attempts("lmstudio", "bad_response")
    async with gw.sdk() as sdk:
        # A direct stream keeps the model busy, so the gateway's request will queue.
        async with direct_stream(direct, flaky, max_tokens=400, min_tokens=400) as hog:
            events = read_events(hog)
            await anext(events)
            request = asyncio.create_task(chat_stream(sdk, max_tokens=16, messages=SLOW_PROMPT))
            # The gateway's request reaches the server and cuts the hog: now it has the
            # model and is reading its prompt.
            rest = [data async for data in events]
            assert rest[-1] == b"[DONE]"
            assert not finish_reasons(rest)
        # A third request cuts the gateway's stream right at its first (role-only) event,
        # before any token: the gateway fails over and the client never knows.
        await cut(direct, flaky)
        headers, text, finish = await request
    assert headers["x-gateway-provider"] == "ollama"
    assert headers["x-gateway-failover"] == "true"
    assert headers["x-gateway-attempts"] == "2"
    assert text.strip()
    assert finish in ("stop", "length")
    assert await gw.attempts("lmstudio", "bad_response") == bad + 1


async def test_cut_after_first_token_ends_with_error_event(flaky, fallback, real_gateway, direct):
    gw = await real_gateway(flaky, fallback, providers=QUIET_PROBES)
    async with gw.sdk() as sdk:
        received, finish, error = await stream_with_fault(sdk, lambda: cut(direct, flaky))
    assert "".join(received).strip()  # the partial text reached the client
    assert finish is None  # the upstream never finished
    assert error is not None, "a truncated stream was presented as complete"
    assert isinstance(error.body, dict)
    assert error.body.get("code") == "stream_interrupted"


async def test_cut_after_first_token_is_rescued_by_the_same_model_elsewhere(
    flaky, fallback, real_gateway, direct
):
    """With rescue on, the cut stream is restarted on the fallback (the same model,
    temperature 0): its text reproduces what the client has, and the client reads one
    whole answer with no error.

    The whole text is not compared with a second answer of the fallback's: llama.cpp
    itself answers the same request otherwise once the prompt is in its cache (measured:
    two identical requests in a row to one server part after 30 characters here), which
    is why a rescue verifies instead of trusting."""
    gw = await real_gateway(flaky, fallback, providers=QUIET_PROBES)
    rescued = await gw.metric("gateway_stream_rescues_total", result="rescued")
    async with gw.sdk() as sdk:
        received, finish, error = await stream_with_fault(
            sdk, lambda: cut(direct, flaky), tokens=150, extra_headers={"x-gateway-rescue": "on"}
        )
    assert error is None, f"the rescue failed: {error}"
    assert finish == "length"  # all 150 tokens: the fallback finished the answer
    assert len([t for t in received if t]) > 3  # more than the primary sent before its cut
    assert await gw.metric("gateway_stream_rescues_total", result="rescued") == rescued + 1
