"""The official openai SDK, async and sync, against the gateway while the primary fails."""

from __future__ import annotations

import asyncio

import openai

from tests import fake_upstream as fu

MESSAGES = [{"role": "user", "content": "Say hello"}]


async def failing_primary(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.rate_limited(retry_after=30)
    client = await gateway(a, b)
    return b, str(client.make_url("/v1"))


async def test_async_sdk_non_stream(gateway, upstreams):
    b, base = await failing_primary(gateway, upstreams)
    async with openai.AsyncOpenAI(base_url=base, api_key="client-key", max_retries=0) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
        completion = raw.parse()
    assert raw.headers["x-gateway-provider"] == "lmstudio"
    assert completion.choices[0].message.content == b.text
    assert completion.usage.total_tokens == 15


async def test_async_sdk_stream(gateway, upstreams):
    b, base = await failing_primary(gateway, upstreams)
    async with openai.AsyncOpenAI(base_url=base, api_key="client-key", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(parts) == b.text


def sync_calls(base: str) -> tuple[str, str]:
    with openai.OpenAI(base_url=base, api_key="client-key", max_retries=0) as sdk:
        completion = sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        stream = sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return completion.choices[0].message.content or "", text


async def test_sync_sdk_stream_and_non_stream(gateway, upstreams):
    b, base = await failing_primary(gateway, upstreams)
    # The sync client runs in a thread while the gateway serves on this loop.
    content, streamed = await asyncio.to_thread(sync_calls, base)
    assert content == b.text
    assert streamed == b.text


async def test_sdk_sees_error_event_after_commit(gateway, upstreams):
    a = await upstreams("a")
    a.default = fu.drop_after(3)
    client = await gateway(a)
    base = str(client.make_url("/v1"))
    received = []
    async with openai.AsyncOpenAI(base_url=base, api_key="k", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        try:
            async for c in stream:
                received.append(c.choices[0].delta.content or "")
        except openai.APIError as e:
            error = e
        else:
            error = None
    assert error is not None and "stream failed after the first token" in error.message
    assert "".join(received) == "".join(fu.WORDS[:3])


async def test_sdk_gets_openai_style_error_when_all_fail(gateway, upstreams, refused_url):
    client = await gateway(refused_url)
    base = str(client.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base, api_key="k", max_retries=0) as sdk:
        try:
            await sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        except openai.APIStatusError as e:
            err = e
    assert err.status_code == 503
    assert err.body["code"] == "all_providers_failed"
    assert "OpenAI: unreachable" in err.body["message"]
