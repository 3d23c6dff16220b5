"""The dialect contract: one suite, run once per dialect against a fake of that vendor's API.

Each :class:`Vendor` says what its API looks like (its fake, the request the gateway must
send, its errors and the outcome each must be classified as); every test below runs for
each of them: request shape and auth header, model rewrite, every error mapping, stream
translation (text, tool calls, an in-stream error before and after the first token),
usage, the probe. The OpenAI dialect, the identity, runs the same contract.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from gateway.config import ProviderConfig, Settings
from gateway.server import PROVIDERS, create_app
from tests import fake_upstream as fu
from tests import fake_vendors as fv
from tests.conftest import PROVIDER_KEY, chat
from tests.fake_upstream import FakeUpstream, wait_until
from tests.test_streaming import read_stream, text_of

CLIENT_KEY = "client-key-never-forwarded"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
IMAGE = "iVBORw0KGgo="
RICH = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMAGE}"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "18 C, sunny"},
        {"role": "user", "content": "Thanks"},
    ],
    "tools": TOOLS,
    "tool_choice": "auto",
    "temperature": 0.5,
    "top_p": 0.9,
    "max_completion_tokens": 50,
    "stop": ["END"],
    "user": "u-1",
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One upstream error and the outcome it must be classified as."""

    name: str
    fault: Callable[[], fu.Behaviour]
    outcome: str
    as_is: bool = False  # returned to the client (in OpenAI's shape), not failed over
    retry_after: float | None = None  # the breaker stays open this long (fail_max is 1)


@dataclass(frozen=True)
class Vendor:
    dialect: str
    fake: type[FakeUpstream]
    model: str | None  # the provider's configured model (None: the client's passes)
    auth: Callable[[dict[str, str]], bool]  # the provider's key, where the vendor wants it
    rich: Callable[[FakeUpstream], None]  # what RICH must look like upstream
    stream_error: Callable[[int], fu.Behaviour]  # n tokens, then an in-stream server error
    errors: list[Case] = field(default_factory=list)
    pinned: str = "other-model"  # a model a client may pin with "dialect/NAME"

    def sent_model(self, fake: FakeUpstream) -> str:
        """The model the last request asked the upstream for."""
        if isinstance(fake, fv.FakeAzure):
            return fake.urls[-1].split("/")[3]  # /openai/deployments/{deployment}/...
        return fake.requests[-1]["model"]


def bearer(headers: dict[str, str]) -> bool:
    return headers.get("Authorization") == f"Bearer {PROVIDER_KEY}"


def anthropic_auth(headers: dict[str, str]) -> bool:
    return (
        headers.get("x-api-key") == PROVIDER_KEY
        and headers.get("anthropic-version") == "2023-06-01"
        and "Authorization" not in headers
    )


def azure_auth(headers: dict[str, str]) -> bool:
    return headers.get("api-key") == PROVIDER_KEY and "Authorization" not in headers


def rich_as_is(fake: FakeUpstream) -> None:
    assert fake.requests[-1] == RICH


def rich_anthropic(fake: FakeUpstream) -> None:
    assert fake.requests[-1] == {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 50,
        "system": "Be brief.",
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in Paris?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": IMAGE}}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "call_9", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_9", "content": "18 C, sunny"},
                {"type": "text", "text": "Thanks"}]},
        ],
        "stop_sequences": ["END"],
        "temperature": 0.5,  # and no top_p: Anthropic's recent models take one of them
        "tools": [{"name": "get_weather", "description": "Current weather",
                   "input_schema": TOOLS[0]["function"]["parameters"]}],
        "tool_choice": {"type": "auto"},
        "metadata": {"user_id": "u-1"},
    }  # fmt: skip


def rich_ollama(fake: FakeUpstream) -> None:
    assert fake.requests[-1] == {
        "model": "llama3.2",
        "stream": False,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?", "images": [IMAGE]},
            {"role": "assistant", "content": "",
             "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "18 C, sunny", "tool_name": "get_weather"},
            {"role": "user", "content": "Thanks"},
        ],
        "options": {"temperature": 0.5, "top_p": 0.9, "num_predict": 50, "stop": ["END"]},
        "tools": TOOLS,
    }  # fmt: skip


def rich_azure(fake: FakeUpstream) -> None:
    assert fake.requests[-1] == RICH  # the client's bytes: the deployment is in the URL
    assert (
        fake.urls[-1] == "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21"
    )


def openai_stream_error(tokens: int) -> fu.Behaviour:
    error = b'data: {"error": {"message": "The server is overloaded", "type": "server_error", "code": null}}\n\n'
    return fu.sse(b"".join(fu.chunk(w) for w in fu.WORDS[:tokens]) + error)


ANTHROPIC_OVERLOADED = fv.anthropic_body("overloaded_error", "Overloaded")
OLLAMA_STREAM_ERROR = {"error": "an error was encountered while running the model: unexpected EOF"}
RESET = "2030-01-01T00:00:00Z"

OPENAI_CASES = [
    Case("429 rate_limit_exceeded", lambda: fu.rate_limited(retry_after=7), "rate_limited", retry_after=7),
    Case("429 insufficient_quota", fu.insufficient_quota, "quota_exhausted"),
    Case("401 invalid_api_key", lambda: fu.openai_error(401, "Incorrect API key provided: sk-***.", "invalid_request_error", "invalid_api_key"), "auth_failed"),
    Case("500", fu.server_error, "server_error"),
    Case("400 context_length_exceeded", fu.context_too_long, "context_too_long"),
    Case("404 model_not_found", lambda: fu.openai_error(404, "The model `x` does not exist", "invalid_request_error", "model_not_found"), "model_missing"),
    Case("400 content_policy_violation", fu.content_refused, "content_refused", as_is=True),
    Case("400 invalid request", fu.bad_request, "client_error", as_is=True),
]  # fmt: skip

VENDORS = [
    Vendor("openai", FakeUpstream, None, bearer, rich_as_is, openai_stream_error, OPENAI_CASES),
    Vendor(
        "anthropic",
        fv.FakeAnthropic,
        "claude-sonnet-4-5-20250929",
        anthropic_auth,
        rich_anthropic,
        lambda n: fv.stream_error(n, ANTHROPIC_OVERLOADED),
        [
            Case("529 overloaded_error", lambda: fv.anthropic_error(529, "overloaded_error", "Overloaded"), "server_error"),
            Case("500 api_error", lambda: fv.anthropic_error(500, "api_error", "Internal server error"), "server_error"),
            Case("429 rate_limit_error with retry-after", lambda: fv.anthropic_error(
                429, "rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit",
                {"retry-after": "7", "anthropic-ratelimit-requests-limit": "50",
                 "anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-reset": RESET}),
                "rate_limited", retry_after=7),
            Case("402 billing_error", lambda: fv.anthropic_error(402, "billing_error", "Your payment method failed"), "quota_exhausted"),
            Case("400 credit balance too low", lambda: fv.anthropic_error(
                400, "invalid_request_error", "Your credit balance is too low to access the Anthropic API. "
                "Please go to Plans & Billing to upgrade or purchase credits."), "quota_exhausted"),
            Case("401 authentication_error", lambda: fv.anthropic_error(401, "authentication_error", "invalid x-api-key"), "auth_failed"),
            Case("403 permission_error", lambda: fv.anthropic_error(403, "permission_error", "Your API key does not have permission to use the specified resource."), "auth_failed"),
            Case("400 prompt is too long", lambda: fv.anthropic_error(400, "invalid_request_error", "prompt is too long: 208310 tokens > 200000 maximum"), "context_too_long"),
            Case("404 not_found_error (model)", lambda: fv.anthropic_error(404, "not_found_error", "model: claude-nope"), "model_missing"),
            Case("400 invalid_request_error", lambda: fv.anthropic_error(400, "invalid_request_error", "messages.0.content: Field required"), "client_error", as_is=True),
            Case("413 request_too_large", lambda: fv.anthropic_error(413, "request_too_large", "Request exceeds the maximum allowed number of bytes."), "client_error", as_is=True),
        ],
        pinned="claude-opus-4-1",
    ),
    Vendor(
        "ollama",
        fv.FakeOllama,
        "llama3.2",
        bearer,
        rich_ollama,
        lambda n: fv.stream_error(n, OLLAMA_STREAM_ERROR),
        [
            Case("404 model not found", lambda: fv.ollama_error(404, 'model "llama3.2" not found, try pulling it first'), "model_missing"),
            Case("500 runner terminated", lambda: fv.ollama_error(500, "llama runner process has terminated: exit status 2"), "server_error"),
            Case("400 input exceeds the context length", lambda: fv.ollama_error(400, "the input length exceeds the context length"), "context_too_long"),
            Case("401 unauthorized", lambda: fv.ollama_error(401, "unauthorized"), "auth_failed"),
            Case("400 invalid format", lambda: fv.ollama_error(400, 'invalid format: expected "json" or a JSON schema'), "client_error", as_is=True),
        ],
        pinned="qwen3:8b",
    ),
    Vendor(
        "azure",
        fv.FakeAzure,
        "gpt-4o-prod",
        azure_auth,
        rich_azure,
        openai_stream_error,
        [
            Case("400 content_filter", fv.azure_content_filter, "content_refused", as_is=True),
            Case("400 ResponsibleAIPolicyViolation (inner code only)", lambda: fv.azure_content_filter(code_in_inner_only=True), "content_refused", as_is=True),
            Case("404 DeploymentNotFound", lambda: fv.azure_error(404, "DeploymentNotFound", "The API deployment for this resource does not exist."), "model_missing"),
            Case("429 with retry-after", lambda: fv.azure_error(
                429, "429", "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 "
                "have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 7 seconds.",
                {"retry-after": "7"}), "rate_limited", retry_after=7),
            Case("401 access denied", lambda: fv.azure_error(401, "401", "Access denied due to invalid subscription key."), "auth_failed"),
            Case("500", lambda: fv.azure_error(500, "InternalServerError", "The server had an error processing your request."), "server_error"),
            Case("400 context_length_exceeded", lambda: fv.azure_error(400, "context_length_exceeded", "This model's maximum context length is 128000 tokens."), "context_too_long"),
        ],
        pinned="gpt-4o-mini-eu",
    ),
]  # fmt: skip

VENDOR_IDS = [v.dialect for v in VENDORS]
CASES = [(v, c) for v in VENDORS for c in v.errors]


def metric(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def attempts(provider: str, outcome: str) -> float:
    return metric("gateway_upstream_attempts_total", {"provider": provider, "outcome": outcome})


async def start(upstreams, vendor: Vendor) -> FakeUpstream:
    fake = await upstreams(vendor.dialect, cls=vendor.fake)
    if isinstance(fake, fv.FakeOllama):
        fake.models.append(vendor.pinned)
    if isinstance(fake, fv.FakeAzure):
        fake.deployments.add(vendor.pinned)
    return fake


async def vendor_gateway(
    aiohttp_client, vendor: Vendor, primary: FakeUpstream, fallback=None, probes=False, **kw
):
    """The vendor's provider first (named after its dialect), an OpenAI fake second."""
    common = {"api_key": PROVIDER_KEY, "fail_max": 1, "max_retries": 0, "reset_timeout": 60,
              "first_token_timeout": 5.0, "idle_timeout": 5.0, "response_timeout": 5.0, **kw}  # fmt: skip
    providers = [ProviderConfig(vendor.dialect, vendor.dialect, primary.url, model=vendor.model,
                                dialect=vendor.dialect, **common)]  # fmt: skip
    if fallback is not None:
        providers.append(ProviderConfig("fallback", "Fallback", fallback.url, **common))
    app = create_app(Settings(providers=tuple(providers)), probes=probes)
    return await aiohttp_client(app, server_kwargs={"handler_cancellation": True})


@pytest.fixture(params=VENDORS, ids=VENDOR_IDS)
def vendor(request) -> Vendor:
    return request.param


async def post(client, body: dict[str, Any]):
    return await client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
    )


# -- request -----------------------------------------------------------------------------


async def test_request_shape_and_auth_header(vendor, upstreams, aiohttp_client):
    fake = await start(upstreams, vendor)
    client = await vendor_gateway(aiohttp_client, vendor, fake)
    resp = await post(client, RICH)
    assert resp.status == 200, await resp.text()
    assert resp.headers["x-gateway-provider"] == vendor.dialect
    vendor.rich(fake)
    headers = fake.headers[-1]
    assert vendor.auth(headers)
    assert CLIENT_KEY not in str(headers)  # the client's own key never goes upstream


async def test_model_rewrite(vendor, upstreams, aiohttp_client):
    fake = await start(upstreams, vendor)
    client = await vendor_gateway(aiohttp_client, vendor, fake)
    await post(client, chat(model="gpt-4o-mini"))
    assert vendor.sent_model(fake) == (vendor.model or "gpt-4o-mini")
    resp = await post(client, chat(model=f"{vendor.dialect}/{vendor.pinned}"))  # pinned
    assert resp.status == 200
    assert vendor.sent_model(fake) == vendor.pinned


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vendor", "case"), CASES, ids=[f"{v.dialect}: {c.name}" for v, c in CASES]
)
async def test_error_mapping(vendor, case, upstreams, aiohttp_client):
    fake, fallback = await start(upstreams, vendor), await upstreams("fallback")
    fake.default = case.fault()
    client = await vendor_gateway(aiohttp_client, vendor, fake, fallback)
    before = attempts(vendor.dialect, case.outcome)
    resp = await post(client, chat())
    body = await resp.json()
    assert attempts(vendor.dialect, case.outcome) - before == 1
    if case.as_is:
        assert resp.status == case.fault().status
        assert resp.headers["x-gateway-provider"] == vendor.dialect
        err = body["error"]  # OpenAI's shape, whatever the vendor's
        assert set(err) >= {"message", "type", "param", "code"} and err["message"]
        assert "request_id" not in body
    else:
        assert resp.status == 200
        assert resp.headers["x-gateway-provider"] == "fallback"
        assert body["choices"][0]["message"]["content"] == fallback.text
    breaker = client.app[PROVIDERS][vendor.dialect].breaker
    if case.retry_after is not None:
        assert case.retry_after - 1 < breaker.retry_in() <= case.retry_after


async def test_server_error_before_a_stream_fails_over(vendor, upstreams, aiohttp_client):
    fake, fallback = await start(upstreams, vendor), await upstreams("fallback")
    fake.default = next(c for c in vendor.errors if c.outcome == "server_error").fault()
    client = await vendor_gateway(aiohttp_client, vendor, fake, fallback)
    resp = await post(client, chat(stream=True))
    datas, done = await read_stream(resp)
    assert resp.headers["x-gateway-provider"] == "fallback" and done
    assert text_of(datas) == fallback.text


# -- streams -----------------------------------------------------------------------------


async def test_stream_translation(vendor, upstreams, aiohttp_client):
    fake = await start(upstreams, vendor)
    fake.default = fu.stream(chunk_delay=0.005)  # reads after the first token: the relay's
    client = await vendor_gateway(aiohttp_client, vendor, fake)
    resp = await post(client, chat(stream=True))
    datas, done = await read_stream(resp)
    assert resp.status == 200 and done
    assert resp.headers["x-gateway-provider"] == vendor.dialect
    assert text_of(datas) == "".join(fu.WORDS)
    assert datas[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(d["object"] == "chat.completion.chunk" for d in datas)
    assert [c["finish_reason"] for d in datas for c in d["choices"] if c["finish_reason"]] == [
        "stop"
    ]


def tool_calls_of(datas: list[dict[str, Any]]) -> dict[int, dict[str, str]]:
    """Tool-call deltas joined as clients join them (strings concatenated per index)."""
    calls: dict[int, dict[str, str]] = {}
    for d in datas:
        for c in d["choices"]:
            for tc in c["delta"].get("tool_calls") or []:
                call = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
                call["id"] += tc.get("id") or ""
                call["name"] += tc.get("function", {}).get("name") or ""
                call["arguments"] += tc.get("function", {}).get("arguments") or ""
    return calls


async def test_tool_call_stream(vendor, upstreams, aiohttp_client):
    fake = await start(upstreams, vendor)
    fake.default = fu.tool()
    client = await vendor_gateway(aiohttp_client, vendor, fake)
    resp = await post(client, chat(stream=True, tools=TOOLS))
    datas, done = await read_stream(resp)
    assert done
    calls = tool_calls_of(datas)
    assert list(calls) == [0]
    assert calls[0]["name"] == fu.TOOL_NAME and calls[0]["id"]
    assert orjson.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert [c["finish_reason"] for d in datas for c in d["choices"] if c["finish_reason"]] == [
        "tool_calls"
    ]


async def test_tool_call_answer(vendor, upstreams, aiohttp_client):
    fake = await start(upstreams, vendor)
    fake.default = fu.tool()
    client = await vendor_gateway(aiohttp_client, vendor, fake)
    resp = await post(client, chat(tools=TOOLS))
    choice = (await resp.json())["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == fu.TOOL_NAME
    assert orjson.loads(call["function"]["arguments"]) == {"city": "Paris"}


async def test_in_stream_error_before_the_first_token_fails_over(vendor, upstreams, aiohttp_client):
    fake, fallback = await start(upstreams, vendor), await upstreams("fallback")
    fake.default = vendor.stream_error(0)
    client = await vendor_gateway(aiohttp_client, vendor, fake, fallback)
    before = attempts(vendor.dialect, "server_error")
    resp = await post(client, chat(stream=True))
    datas, done = await read_stream(resp)
    assert resp.headers["x-gateway-provider"] == "fallback" and done
    assert text_of(datas) == fallback.text
    assert attempts(vendor.dialect, "server_error") - before == 1


async def test_in_stream_error_after_the_first_token_cuts_the_stream(
    vendor, upstreams, aiohttp_client
):
    fake, fallback = await start(upstreams, vendor), await upstreams("fallback")
    fake.default = vendor.stream_error(3)
    client = await vendor_gateway(aiohttp_client, vendor, fake, fallback)
    resp = await post(client, chat(stream=True))
    datas, done = await read_stream(resp)
    assert resp.headers["x-gateway-provider"] == vendor.dialect and not done
    assert text_of(datas[:-1]) == "".join(fu.WORDS[:3])
    assert datas[-1]["error"]["code"] == "stream_interrupted"


# -- usage -------------------------------------------------------------------------------

USAGE = {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15}


async def test_usage(vendor, upstreams, aiohttp_client):
    fake = await start(upstreams, vendor)
    client = await vendor_gateway(aiohttp_client, vendor, fake)
    tokens = {"provider": vendor.dialect, "kind": "prompt"}
    before = metric("gateway_tokens_total", tokens)
    resp = await post(client, chat())
    assert (await resp.json())["usage"] == USAGE
    resp = await post(client, chat(stream=True, stream_options={"include_usage": True}))
    datas, done = await read_stream(resp)
    assert done
    assert datas[-1]["choices"] == [] and datas[-1]["usage"] == USAGE  # OpenAI's usage chunk
    assert sum(1 for d in datas if d.get("usage")) == 1
    assert metric("gateway_tokens_total", tokens) - before == 18


# -- probe -------------------------------------------------------------------------------


async def test_probe(vendor, upstreams, aiohttp_client):
    fake = await start(upstreams, vendor)
    client = await vendor_gateway(aiohttp_client, vendor, fake, probes=True, probe_interval=0.05)
    provider = client.app[PROVIDERS][vendor.dialect]
    await wait_until(lambda: provider.loaded_models is not None)
    assert provider.prober.last.error is None
    assert set(fake.models) <= provider.loaded_models
    assert vendor.auth(fake.probe_headers[-1])
    assert not provider.lacks_model(vendor.model or "gpt-4o-mini")
    report = (await (await client.get("/admin/providers")).json())["providers"][0]
    running = ["llama3.2:latest"] if vendor.dialect == "ollama" else None
    assert report["running_models"] == running
