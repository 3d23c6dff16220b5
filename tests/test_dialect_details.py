"""What each dialect does beyond the shared contract (tests/test_dialects.py): Anthropic's
required ``max_tokens`` and tool choices, requests a vendor cannot express, streams split
anywhere, Anthropic's rate-limit headers, the OpenAI dialect's compatibility options for
local servers, and the configuration of dialects."""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, load_settings
from gateway.providers.anthropic import AnthropicTranslator
from gateway.providers.ollama import OllamaTranslator
from gateway.server import PROVIDERS, create_app
from gateway.sse import SSEError, SSEParser
from tests import fake_upstream as fu
from tests import fake_vendors as fv
from tests.conftest import chat
from tests.fake_upstream import wait_until
from tests.test_dialects import TOOLS, VENDORS, attempts, post, start, vendor_gateway
from tests.test_streaming import read_stream, text_of

ANTHROPIC, OLLAMA = VENDORS[1], VENDORS[2]


# -- Anthropic's request ------------------------------------------------------------------


async def test_anthropic_max_tokens_default_roles_and_caps(upstreams, aiohttp_client):
    fake = await start(upstreams, ANTHROPIC)
    client = await vendor_gateway(aiohttp_client, ANTHROPIC, fake)
    messages = [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": [{"type": "text", "text": "there"}]},
    ]
    resp = await post(
        client, {"model": "m", "messages": messages, "temperature": 1.7, "stop": "END"}
    )
    assert resp.status == 200
    sent = fake.requests[-1]
    assert sent["max_tokens"] == 4096  # required by Anthropic: the documented default
    assert sent["system"] == "Answer in French."
    assert sent["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}],
        }
    ]  # turns of one role merged: Anthropic wants them alternating
    assert sent["temperature"] == 1.0 and sent["stop_sequences"] == ["END"]
    client = await vendor_gateway(aiohttp_client, ANTHROPIC, fake, default_max_tokens=300)
    await post(client, chat())
    assert fake.requests[-1]["max_tokens"] == 300


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            None,
            {"type": "tool", "name": "get_weather"},
        ),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ],
)
async def test_anthropic_tool_choice(choice, parallel, expected, upstreams, aiohttp_client):
    fake = await start(upstreams, ANTHROPIC)
    client = await vendor_gateway(aiohttp_client, ANTHROPIC, fake)
    extra: dict[str, Any] = {"tools": TOOLS}
    if choice is not None:
        extra["tool_choice"] = choice
    if parallel is not None:
        extra["parallel_tool_calls"] = parallel
    await post(client, chat(**extra))
    assert fake.requests[-1]["tool_choice"] == expected


# -- requests a vendor cannot take --------------------------------------------------------


@pytest.mark.parametrize(
    ("vendor", "extra"),
    [
        (ANTHROPIC, {"n": 2}),
        (ANTHROPIC, {"response_format": {"type": "json_object"}}),
        (OLLAMA, {"logprobs": True}),
        (
            OLLAMA,
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
                    }
                ]
            },
        ),
    ],
    ids=["anthropic n=2", "anthropic json mode", "ollama logprobs", "ollama image URL"],
)
async def test_what_a_dialect_cannot_express_goes_to_the_next_provider(
    vendor, extra, upstreams, aiohttp_client
):
    fake, fallback = await start(upstreams, vendor), await upstreams("fallback")
    client = await vendor_gateway(aiohttp_client, vendor, fake, fallback)
    before = attempts(vendor.dialect, "unsupported")
    resp = await post(client, chat(**extra))
    assert resp.status == 200 and resp.headers["x-gateway-provider"] == "fallback"
    assert attempts(vendor.dialect, "unsupported") - before == 1
    assert fake.requests == []  # never sent
    assert client.app[PROVIDERS][vendor.dialect].breaker.state.value == "closed"


async def test_a_request_too_malformed_to_translate_is_the_clients_400(upstreams, aiohttp_client):
    fake, fallback = await start(upstreams, ANTHROPIC), await upstreams("fallback")
    client = await vendor_gateway(aiohttp_client, ANTHROPIC, fake, fallback)
    resp = await post(client, {"model": "m", "messages": [{"role": "user", "content": "hi"}, 5]})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["type"] == "invalid_request_error" and "messages[1]" in err["message"]
    assert fake.requests == [] and fallback.requests == []
    provider = client.app[PROVIDERS]["anthropic"]
    assert provider.breaker.retry_in() == 0 and provider.limiter.in_use == 0  # nothing held


# -- Anthropic's rate-limit headers ----------------------------------------------------------


async def test_anthropic_ratelimit_headers_teach_the_budget(upstreams, aiohttp_client):
    fake, fallback = await start(upstreams, ANTHROPIC), await upstreams("fallback")
    spent = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": "2030-01-01T00:00:00Z",  # clamped to 300 s
    }
    fake.then(fu.ok(headers=spent))
    client = await vendor_gateway(aiohttp_client, ANTHROPIC, fake, fallback)
    resp = await post(client, chat())
    assert resp.headers["x-gateway-provider"] == "anthropic"
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"  # in OpenAI's terms
    assert "anthropic-ratelimit-requests-remaining" not in resp.headers
    before = attempts("anthropic", "out_of_budget")
    resp = await post(client, chat())
    assert resp.headers["x-gateway-provider"] == "fallback"  # the budget held it back
    assert attempts("anthropic", "out_of_budget") - before == 1
    budget = client.app[PROVIDERS]["anthropic"].budget.report()
    assert budget["requests"]["source"] == "learned" and budget["requests"]["remaining"] == 0


# -- stream translation, whatever the reads ---------------------------------------------------


def anthropic_stream() -> bytes:
    def event(kind: str, **data: Any) -> bytes:
        return f"event: {kind}\ndata: ".encode() + orjson.dumps({"type": kind, **data}) + b"\n\n"

    return b"".join([
        event("message_start", message={"id": "msg_1", "model": "claude", "usage": {"input_tokens": 5, "cache_read_input_tokens": 2, "output_tokens": 1}}),
        event("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
        event("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "Hmm."}),
        event("content_block_delta", index=0, delta={"type": "signature_delta", "signature": "abc"}),
        event("content_block_stop", index=0),
        event("ping"),
        event("content_block_start", index=1, content_block={"type": "text", "text": ""}),
        event("content_block_delta", index=1, delta={"type": "text_delta", "text": "Bonjour"}),
        event("content_block_stop", index=1),
        event("content_block_start", index=2, content_block={"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}),
        event("content_block_delta", index=2, delta={"type": "input_json_delta", "partial_json": '{"city": '}),
        event("content_block_delta", index=2, delta={"type": "input_json_delta", "partial_json": '"Paris"}'}),
        event("content_block_stop", index=2),
        event("brand_new_event", anything=1),
        event("message_delta", delta={"stop_reason": "tool_use"}, usage={"output_tokens": 7}),
        event("message_stop"),
    ])  # fmt: skip


def ollama_stream() -> bytes:
    lines = [
        {"model": "llama3.2", "message": {"role": "assistant", "content": "", "thinking": "Hmm."}, "done": False},
        {"model": "llama3.2", "message": {"role": "assistant", "content": "Bon"}, "done": False},
        {"model": "llama3.2", "message": {"role": "assistant", "content": "jour"}, "done": False},
        {"model": "llama3.2", "message": {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}, "done": False},
        {"model": "llama3.2", "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop", "prompt_eval_count": 7, "eval_count": 7},
    ]  # fmt: skip
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def translate(translator: Any, stream: bytes, cuts: list[int]) -> list[Any]:
    """The OpenAI events a translator makes of ``stream`` read in pieces cut at ``cuts``."""
    out = b""
    bounds = [0, *sorted(set(cuts)), len(stream)]
    for lo, hi in itertools.pairwise(bounds):
        if hi > lo:
            out += translator.feed(stream[lo:hi], False)
    out += translator.feed(b"", True)
    events: list[Any] = []
    for e in SSEParser().feed(out):
        try:
            events.append(orjson.loads(e.data) if e.data not in (None, b"[DONE]") else e.data)
        except orjson.JSONDecodeError:
            events.append(e.data)  # as the stream state gets it
    return events


def summary(events: list[Any]) -> dict[str, Any]:
    """What a client makes of the events: the text, thinking, tool calls, finish, usage."""
    datas = [e for e in events if isinstance(e, dict)]
    deltas = [c["delta"] for d in datas for c in d["choices"]]
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    return {
        "role": deltas[0].get("role"),
        "text": "".join(d.get("content") or "" for d in deltas),
        "thinking": "".join(d.get("reasoning_content") or "" for d in deltas),
        "tool": ("".join(tc["function"].get("name", "") for tc in calls),
                 "".join(tc["function"].get("arguments", "") for tc in calls)),
        "finish": [c["finish_reason"] for d in datas for c in d["choices"] if c["finish_reason"]],
        "usage": [d["usage"] for d in datas if d.get("usage")],
        "done": events[-1] == b"[DONE]",
        "keepalives": events.count(None),
    }  # fmt: skip


EXPECTED = {
    "role": "assistant",
    "text": "Bonjour",
    "thinking": "Hmm.",
    "tool": ("get_weather", '{"city": "Paris"}'),
    "finish": ["tool_calls"],
    "usage": [{"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14}],
    "done": True,
}


@settings(max_examples=150, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=12))
def test_translated_streams_do_not_depend_on_where_reads_end(cuts):
    stream = anthropic_stream()
    got = summary(
        translate(
            AnthropicTranslator("claude", False, 1 << 20), stream, [c % len(stream) for c in cuts]
        )
    )
    usage = dict(EXPECTED["usage"][0], prompt_tokens_details={"cached_tokens": 2})
    assert got == {**EXPECTED, "usage": [usage], "keepalives": 1}  # ping: a comment
    stream = ollama_stream()
    got = summary(
        translate(
            OllamaTranslator("llama3.2", False, 1 << 20), stream, [c % len(stream) for c in cuts]
        )
    )
    assert got == {**EXPECTED, "tool": ("get_weather", '{"city":"Paris"}'), "keepalives": 0}


@pytest.mark.parametrize(
    ("translator", "stream"),
    [
        (AnthropicTranslator("c", False, 1024), anthropic_stream()),
        (OllamaTranslator("l", False, 1024), ollama_stream()),
    ],
    ids=["anthropic", "ollama"],
)
def test_a_vendor_event_past_the_bound_is_refused(translator, stream):
    stream = stream.replace(b"Bon", b"x" * 2000)
    with pytest.raises(SSEError):  # the relay's verdict: bad_response
        for i in range(0, len(stream), 100):
            translator.feed(stream[i : i + 100], False)


def test_an_unreadable_vendor_event_is_judged_as_a_malformed_one():
    events = translate(
        OllamaTranslator("l", False, 1 << 20), b'{"message": {"content": "Hi"}}\n{broken\n', []
    )
    assert isinstance(events[0], dict) and isinstance(events[-1], bytes)  # not JSON, as it came


# -- native Ollama --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ({"type": "json_object"}, "json"),
        (
            {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}},
            {"type": "object"},
        ),
    ],
)
async def test_ollama_response_format(fmt, expected, upstreams, aiohttp_client):
    fake = await start(upstreams, OLLAMA)
    client = await vendor_gateway(aiohttp_client, OLLAMA, fake)
    await post(client, chat(response_format=fmt))
    assert fake.requests[-1]["format"] == expected


async def test_a_model_ollama_has_not_pulled_is_missing(upstreams, aiohttp_client):
    fake, fallback = await start(upstreams, OLLAMA), await upstreams("fallback")
    client = await vendor_gateway(aiohttp_client, OLLAMA, fake, fallback)
    before = attempts("ollama", "model_missing")
    resp = await post(client, chat(model="ollama/mistral"))  # the fake's real 404
    assert resp.headers["x-gateway-provider"] == "fallback"
    assert attempts("ollama", "model_missing") - before == 1


async def test_a_model_not_in_memory_is_reported(upstreams, aiohttp_client, caplog):
    fake = await start(upstreams, OLLAMA)
    fake.running = []  # pulled, not loaded: /api/ps lists nothing
    caplog.set_level(logging.INFO, "gateway")
    client = await vendor_gateway(aiohttp_client, OLLAMA, fake, probes=True, probe_interval=0.05)
    await wait_until(lambda: "provider 1/1" in caplog.text)
    assert "model 'llama3.2' is not in memory yet: the first request loads it" in caplog.text
    report = (await (await client.get("/admin/providers")).json())["providers"][0]
    assert report["running_models"] == [] and report["loaded_models"] == [
        "llama3.2:latest",
        "qwen3:8b",
    ]
    resp = await post(client, chat())  # not a reason to skip it
    assert resp.headers["x-gateway-provider"] == "ollama"


# -- the OpenAI dialect's compatibility options ------------------------------------------------


async def local_gateway(aiohttp_client, local, hosted, tmp_path, toml: str = ""):
    """The seed's configuration: OpenAI (``hosted``) and LM Studio (``local``)."""
    path = tmp_path / "gateway.toml"
    path.write_text(toml)
    env = {"OPENAI_BASE_URL": hosted.url, "OPENAI_API_KEY": "sk-test", "LMSTUDIO_BASE_URL": local.url,
           "OLLAMA_BASE_URL": "", "GATEWAY_CONFIG": str(path)}  # fmt: skip
    app = create_app(load_settings(env), probes=False)
    return await aiohttp_client(app)


async def test_max_completion_tokens_is_sent_as_max_tokens_to_local_servers(
    upstreams, aiohttp_client, tmp_path
):
    local, hosted = await upstreams("lmstudio"), await upstreams("openai")
    client = await local_gateway(aiohttp_client, local, hosted, tmp_path)
    await post(client, chat(model="lmstudio/qwen", max_completion_tokens=50))
    assert (
        local.requests[-1]["max_tokens"] == 50 and "max_completion_tokens" not in local.requests[-1]
    )
    await post(client, chat(max_completion_tokens=50))  # OpenAI reads it (o-series want it)
    assert (
        hosted.requests[-1]["max_completion_tokens"] == 50
        and "max_tokens" not in hosted.requests[-1]
    )
    client = await local_gateway(
        aiohttp_client,
        local,
        hosted,
        tmp_path,
        "[providers.lmstudio]\nmap_max_completion_tokens = false\n",
    )
    await post(client, chat(model="lmstudio/qwen", max_completion_tokens=50))
    assert (
        local.requests[-1]["max_completion_tokens"] == 50 and "max_tokens" not in local.requests[-1]
    )


def sdk_tool_call(base: str) -> tuple[str, str, str]:
    """The tool call the official SDK's stream helper assembles from the deltas."""
    with openai.OpenAI(base_url=base, api_key="k", max_retries=0) as sdk:
        with sdk.chat.completions.stream(
            model="lmstudio/qwen", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS
        ) as stream:
            for _ in stream:
                pass
            call = stream.get_final_completion().choices[0].message.tool_calls[0]
    return call.id, call.function.name, call.function.arguments


async def test_repeated_tool_call_names_are_dropped_for_the_sdk(
    upstreams, aiohttp_client, tmp_path
):
    local, hosted = await upstreams("lmstudio"), await upstreams("openai")
    local.default = fu.tool(repeat_names=True)  # llama.cpp's deltas
    client = await local_gateway(aiohttp_client, local, hosted, tmp_path)
    base = str(client.make_url("/v1"))
    ident, name, arguments = await asyncio.to_thread(sdk_tool_call, base)
    assert (ident, name) == ("call_1", fu.TOOL_NAME)
    assert orjson.loads(arguments) == {"city": "Paris"}
    client = await local_gateway(
        aiohttp_client,
        local,
        hosted,
        tmp_path,
        "[providers.lmstudio]\ndedupe_tool_call_names = false\n",
    )
    _, name, _ = await asyncio.to_thread(sdk_tool_call, str(client.make_url("/v1")))
    assert name == fu.TOOL_NAME * 3  # what the SDK builds without the option


async def test_streams_the_option_does_not_need_pass_untouched(upstreams, aiohttp_client, tmp_path):
    local, hosted = await upstreams("lmstudio"), await upstreams("openai")
    client = await local_gateway(aiohttp_client, local, hosted, tmp_path)
    for default, extra in ((fu.ok(), {}), (fu.tool(), {"tools": TOOLS})):  # no tools; no repeats
        local.default = default
        resp = await post(client, chat(stream=True, model="lmstudio/qwen", **extra))
        assert await resp.read() == local.sent[-1]


# -- configuration ----------------------------------------------------------------------------


def settings_from(tmp_path, toml: str, **env: str):
    path = tmp_path / "gateway.toml"
    path.write_text(toml)
    return load_settings({"OPENAI_API_KEY": "sk-test", "GATEWAY_CONFIG": str(path), **env})


def test_dialects_in_toml(tmp_path):
    s = settings_from(
        tmp_path,
        """
[gateway]
failover_order = ["openai", "claude", "ollama", "azure"]

[providers.claude]
dialect = "anthropic"
base_url = "https://api.anthropic.com"
api_key_env = "ANTHROPIC_API_KEY"
model = "claude-sonnet-4-5"

[providers.ollama]
dialect = "ollama"

[providers.azure]
dialect = "azure"
base_url = "https://res.openai.azure.com/openai/"
api_key_env = "AZURE_OPENAI_API_KEY"
model = "gpt-4o-prod"
api_version = "2025-01-01-preview"
""",
        ANTHROPIC_API_KEY="sk-ant",
        OLLAMA_BASE_URL="http://gpu-box:11434/v1",  # the seed's variable, with /v1 or not
        AZURE_OPENAI_API_KEY="az-key",
    )
    claude, ollama, azure = s.providers[1:]
    assert (claude.dialect, claude.base_url, claude.api_key) == (
        "anthropic",
        "https://api.anthropic.com/v1",
        "sk-ant",
    )
    assert (ollama.dialect, ollama.base_url, ollama.model) == (
        "ollama",
        "http://gpu-box:11434",
        "llama3.2",
    )
    assert (azure.base_url, azure.api_version) == (
        "https://res.openai.azure.com/openai",
        "2025-01-01-preview",
    )
    assert not (
        ollama.map_max_completion_tokens or ollama.dedupe_tool_call_names
    )  # openai dialect's
    s = settings_from(tmp_path, "")  # the compatibility options: on for the local servers
    assert [(p.map_max_completion_tokens, p.dedupe_tool_call_names) for p in s.providers] == [
        (False, False), (True, True), (True, True)]  # fmt: skip


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[providers.lmstudio]\ndialect = "grpc"',
            "providers.lmstudio.dialect: unknown dialect (known: openai, anthropic, ollama, azure)",
        ),
        (
            "[providers.lmstudio]\ndefault_max_tokens = 100",
            "providers.lmstudio.default_max_tokens: applies to the anthropic dialect, not 'openai'",
        ),
        (
            '[providers.ollama]\ndialect = "ollama"\nmap_max_completion_tokens = true',
            "providers.ollama.map_max_completion_tokens: applies to the openai and azure dialect, not 'ollama'",
        ),
        (
            '[providers.x]\ndialect = "anthropic"\nbase_url = "https://a"\ndefault_max_tokens = 0',
            "providers.x.default_max_tokens: must be at least 1",
        ),
        (
            '[providers.x]\ndialect = "azure"\nbase_url = "https://a"\napi_version = 5',
            "providers.x.api_version: must be a string, got 5",
        ),
    ],
)
def test_dialect_settings_errors_name_the_key(tmp_path, toml, message):
    with pytest.raises(ConfigError) as e:
        settings_from(tmp_path, toml)
    assert str(e.value) == message


async def test_azure_url_from_configuration(tmp_path, upstreams, aiohttp_client):
    fake = await upstreams("azure", cls=fv.FakeAzure)
    root = fake.url.removesuffix("/v1")
    s = settings_from(
        tmp_path,
        f'[gateway]\nfailover_order = ["azure"]\n[providers.azure]\ndialect = "azure"\nbase_url = "{root}/openai"\napi_key = "{fake.key}"\nmodel = "gpt-4o-prod"\napi_version = "2025-01-01-preview"\n',
    )
    client = await aiohttp_client(create_app(s, probes=False))
    resp = await post(client, chat(stream=True))
    datas, done = await read_stream(resp)
    assert done and text_of(datas) == fake.text
    assert (
        fake.urls[-1]
        == "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2025-01-01-preview"
    )
