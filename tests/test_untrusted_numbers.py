"""Numbers from upstreams are untrusted: absurd ``Retry-After`` hints and ``usage`` blocks
are clamped or ignored, and never turn an answer into a 500 (issue 11, item 2)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiohttp import web

from gateway.server import PROVIDERS
from tests import fake_upstream as fu
from tests.conftest import chat
from tests.test_metrics import key, scrape

QUOTA_RESET = 300.0  # ProviderConfig's default quota_reset_timeout: the most a hint counts

ABSURD = [
    {"Retry-After": "inf"},
    {"Retry-After": "1e12"},
    {"Retry-After": "nan"},
    {"Retry-After": "-5"},
    {"retry-after-ms": "1e300"},
    {"x-ratelimit-reset-requests": "99999999999h", "x-ratelimit-remaining-requests": "0"},
]


def with_headers(behaviour: fu.Behaviour, headers: dict[str, str]) -> fu.Behaviour:
    behaviour.headers = dict(headers)
    return behaviour


def sane_retry_after(resp: Any) -> int:
    value = int(resp.headers["Retry-After"])
    assert 1 <= value <= QUOTA_RESET * 1.2 + 1  # the cap, and the answer's jitter
    return value


async def check_admin(client: Any) -> None:
    """/admin/providers answers, and no breaker reopens later than the cap allows."""
    resp = await client.get("/admin/providers")
    assert resp.status == 200
    for provider in (await resp.json())["providers"]:
        if provider["reopens_at"] is not None:
            reopens = datetime.fromisoformat(provider["reopens_at"])
            assert (reopens - datetime.now(UTC)).total_seconds() <= QUOTA_RESET + 1


@pytest.mark.parametrize(
    "headers", ABSURD, ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items())
)
async def test_absurd_rate_limit_hint_gives_a_clean_429(gateway, upstreams, caplog, headers):
    a = await upstreams("a")
    a.default = with_headers(fu.rate_limited(), headers)
    client = await gateway(a)
    statuses = []
    with caplog.at_level(logging.INFO, logger="gateway"):
        for _ in range(2):  # the second one meets the breaker the first may have opened
            resp = await client.post("/v1/chat/completions", json=chat())
            statuses.append(resp.status)
            assert (await resp.json())["error"]["code"] in (
                "rate_limit_exceeded",
                "all_providers_failed",
            )
            sane_retry_after(resp)
            await check_admin(client)
    # The first is all rate limits. The second may meet a breaker that the rate limits
    # opened without a usable hint (fail_max reached): a 503, as for any open breaker.
    assert statuses[0] == 429 and statuses[1] in (429, 503)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request id=")]
    assert [int(line.split(" status=")[1].split()[0]) for line in lines] == statuses


@pytest.mark.parametrize("headers", ABSURD[:2], ids=["inf", "1e12"])
async def test_absurd_server_error_hint_gives_a_clean_503(gateway, upstreams, headers):
    a = await upstreams("a")
    a.default = with_headers(fu.server_error(503), headers)
    client = await gateway(a)
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "all_providers_failed"
    sane_retry_after(resp)
    await check_admin(client)


@pytest.fixture
async def usage_upstream(aiohttp_server):
    """An upstream whose answers carry ``state["usage"]`` (streamed or not)."""
    state: dict[str, Any] = {"usage": None}

    async def answer(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        if not body.get("stream"):
            data = {**fu.completion("hi", "m"), "usage": state["usage"]}
            return web.Response(body=orjson.dumps(data), content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        final = {
            "id": "c",
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": state["usage"],
        }
        await resp.write(fu.chunk("hi") + fu.chunk(finish="stop"))
        await resp.write(b"data: " + orjson.dumps(final) + b"\n\ndata: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}/v1", state


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(
    ("usage", "counted"),
    [
        ({"prompt_tokens": -5, "completion_tokens": 3}, (0, 3)),
        ({"prompt_tokens": True, "completion_tokens": "7"}, (0, 0)),
        ({"prompt_tokens": 1.5e300, "completion_tokens": 10**19}, (0, 0)),
        (
            {"prompt_tokens": "1\n2026-01-01 WARNING gateway: forged", "completion_tokens": 2},
            (0, 2),
        ),
        ([1, 2], (0, 0)),
    ],
    ids=["negative", "bool-and-string", "huge", "forged-line", "not-an-object"],
)
async def test_bad_usage_is_ignored(gateway, usage_upstream, caplog, stream, usage, counted):
    url, state = usage_upstream
    state["usage"] = usage
    client = await gateway(url)
    before = await scrape(client)
    with caplog.at_level(logging.INFO, logger="gateway"):
        resp = await client.post("/v1/chat/completions", json=chat(stream=stream))
        assert resp.status == 200
        text = await resp.text()
    assert "hi" in text
    after = await scrape(client)
    for kind, n in zip(("prompt", "completion"), counted, strict=True):
        k = key("gateway_tokens_total", provider="openai", kind=kind)
        assert after.get(k, 0) - before.get(k, 0) == n
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request id=")]
    assert len(lines) == 1 and " status=200 " in lines[0]
    assert "\n" not in lines[0] and "forged" not in lines[0]


async def test_a_hint_never_outlasts_the_providers_own_cap(gateway, upstreams):
    """With quota_reset_timeout = 60, an infinite Retry-After opens the breaker for 60 s."""
    a = await upstreams("a")
    a.default = with_headers(fu.rate_limited(), {"Retry-After": "inf"})
    client = await gateway(a, quota_reset_timeout=60, max_retries=0)
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.status == 429
    assert 1 <= int(resp.headers["Retry-After"]) <= 60 * 1.2 + 1
    assert client.app[PROVIDERS]["openai"].breaker.retry_in() <= 60
