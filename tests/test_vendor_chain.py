"""A chain of three vendors, openai -> anthropic -> ollama (configured with ``dialect`` in
TOML), behind the official ``openai`` SDK: stream and non-stream, failing over between
vendors before the first token. The client never learns that three APIs were spoken."""

from __future__ import annotations

import openai
import orjson

from gateway.config import load_settings
from gateway.server import create_app
from tests import fake_upstream as fu
from tests import fake_vendors as fv
from tests.conftest import PROVIDER_KEY
from tests.test_dialects import TOOLS

MESSAGES = [{"role": "user", "content": "Say hello"}]
CLAUDE = "claude-sonnet-4-5-20250929"


async def chain(upstreams, aiohttp_client, tmp_path):
    hosted = await upstreams("openai")
    claude = await upstreams("anthropic", cls=fv.FakeAnthropic)
    local = await upstreams("ollama", cls=fv.FakeOllama)
    local.text = "".join(fu.WORDS)
    path = tmp_path / "gateway.toml"
    path.write_text(f"""
[gateway]
failover_order = ["openai", "anthropic", "ollama"]

[defaults]
max_retries = 0

[providers.anthropic]
dialect = "anthropic"
base_url = "{claude.url.removesuffix("/v1")}"
api_key_env = "ANTHROPIC_API_KEY"
model = "{CLAUDE}"

[providers.ollama]
dialect = "ollama"
model = "llama3.2"
""")
    env = {
        "GATEWAY_CONFIG": str(path),
        "OPENAI_BASE_URL": hosted.url,
        "OPENAI_API_KEY": PROVIDER_KEY,
        "ANTHROPIC_API_KEY": PROVIDER_KEY,
        "OLLAMA_BASE_URL": local.url,  # the seed's variable: /v1 is dropped for the native API
    }
    client = await aiohttp_client(create_app(load_settings(env), probes=False))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="client", max_retries=0)
    return hosted, claude, local, sdk


async def test_non_stream_fails_over_across_vendors(upstreams, aiohttp_client, tmp_path):
    hosted, claude, local, sdk = await chain(upstreams, aiohttp_client, tmp_path)
    hosted.default = fu.rate_limited(retry_after=30)
    async with sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
        completion = raw.parse()
        assert raw.headers["x-gateway-provider"] == "anthropic"
        assert raw.headers["x-gateway-attempts"] == "2"
        assert completion.choices[0].message.content == claude.text
        assert completion.usage.prompt_tokens == 9 and completion.usage.completion_tokens == 6
        assert claude.requests[-1]["model"] == CLAUDE

        claude.then(fv.anthropic_error(529, "overloaded_error", "Overloaded"))
        raw = await sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
        completion = raw.parse()
        assert raw.headers["x-gateway-provider"] == "ollama"
        assert completion.choices[0].message.content == local.text
        assert local.requests[-1]["model"] == "llama3.2"
    assert len(hosted.requests) == 1  # its 429's Retry-After keeps it skipped meanwhile


async def test_stream_fails_over_across_vendors_before_the_first_token(
    upstreams, aiohttp_client, tmp_path
):
    hosted, claude, local, sdk = await chain(upstreams, aiohttp_client, tmp_path)
    hosted.default = fu.server_error(502)
    claude.default = fv.stream_error(0, fv.anthropic_body("overloaded_error", "Overloaded"))
    async with sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        parts = [c.choices[0].delta.content or "" async for c in raw.parse() if c.choices]
    assert raw.headers["x-gateway-provider"] == "ollama"
    assert raw.headers["x-gateway-attempts"] == "3"
    assert "".join(parts) == local.text
    assert hosted.requests and claude.requests and local.requests[-1]["stream"] is True


async def test_stream_with_a_tool_call_from_anthropic(upstreams, aiohttp_client, tmp_path):
    hosted, claude, local, sdk = await chain(upstreams, aiohttp_client, tmp_path)
    hosted.default = fu.server_error(503)
    claude.default = fu.tool()
    async with sdk:
        async with sdk.chat.completions.stream(
            model="gpt-4o-mini", messages=MESSAGES, tools=TOOLS
        ) as stream:
            async for _ in stream:
                pass
            final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.function.name == fu.TOOL_NAME and call.id == "toolu_1"
    assert orjson.loads(call.function.arguments) == {"city": "Paris"}
    assert claude.requests[-1]["tools"][0]["name"] == fu.TOOL_NAME
