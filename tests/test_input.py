"""Bad input gets a clear OpenAI-style 4xx, never a 500 or a traceback."""

from __future__ import annotations

import pytest

from gateway.auth import AccessPolicy, digest
from gateway.server import PROVIDERS
from tests.conftest import chat
from tests.fake_upstream import wait_until


async def check_error(resp, status, param=None):
    assert resp.status == status
    body = await resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    assert resp.headers["x-request-id"]
    return body["error"]


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"{not json", None),
        (b"", None),
        (b"[1, 2]", None),
        (b'"text"', None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "", "messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "m"}', "messages"),
        (b'{"model": "m", "messages": []}', "messages"),
        (b'{"model": "m", "messages": "hi"}', "messages"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
            "stream",
        ),
        (b"\xff\xfe invalid utf-8", None),
    ],
)
async def test_bad_chat_bodies(gateway, upstreams, raw, param):
    a = await upstreams("a")
    client = await gateway(a)
    resp = await client.post(
        "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
    )
    await check_error(resp, 400, param)
    assert a.requests == []


async def test_other_endpoints_need_their_fields(gateway, upstreams):
    a = await upstreams("a")
    client = await gateway(a)
    await check_error(await client.post("/v1/embeddings", json={"model": "m"}), 400, "input")
    await check_error(await client.post("/v1/completions", json={"model": "m"}), 400, "prompt")
    resp = await client.post("/v1/embeddings", json={"model": "m", "input": "x", "stream": True})
    await check_error(resp, 400, "stream")


async def test_body_over_limit_is_413(gateway, upstreams):
    a = await upstreams("a")
    client = await gateway(a, settings={"max_body_bytes": 4096})
    big = chat()
    big["messages"][0]["content"] = "x" * 10_000
    err = await check_error(await client.post("/v1/chat/completions", json=big), 413)
    assert err["code"] == "request_too_large"

    async def chunks():
        for _ in range(10):
            yield b"x" * 1000

    # without a Content-Length, the limit still holds while reading
    resp = await client.post("/v1/chat/completions", data=chunks())
    await check_error(resp, 413)
    assert a.requests == []


async def test_unknown_route_and_method(gateway, upstreams):
    a = await upstreams("a")
    client = await gateway(a)
    err = await check_error(await client.get("/v1/nothing"), 404)
    assert err["code"] == "not_found"
    await check_error(await client.get("/v1/chat/completions"), 405)


async def test_bad_request_id_is_replaced(gateway, upstreams):
    a = await upstreams("a")
    client = await gateway(a)
    resp = await client.post(
        "/v1/chat/completions", json=chat(), headers={"x-request-id": "bad id\twith spaces"}
    )
    assert resp.status == 200
    rid = resp.headers["x-request-id"]
    assert rid != "bad id\twith spaces" and len(rid) == 32


async def test_timeout_header_bounds(gateway, upstreams):
    a = await upstreams("a")
    client = await gateway(a)
    for bad in ("abc", "0", "-1", "100000"):
        resp = await client.post(
            "/v1/chat/completions", json=chat(), headers={"x-gateway-timeout": bad}
        )
        await check_error(resp, 400)
    resp = await client.post(
        "/v1/chat/completions", json=chat(), headers={"x-gateway-timeout": "10"}
    )
    assert resp.status == 200


async def test_healthz_and_models(gateway, upstreams):
    a = await upstreams("a", models=("gpt-4o-mini", "gpt-4o"))
    b = await upstreams("b", models=("local-model", "qwen"))
    client = await gateway(a, b, probes=True, aliases={"fast": "gpt-4o-mini"})
    assert (await (await client.get("/healthz")).json()) == {"status": "ok"}
    providers = client.app[PROVIDERS]
    await wait_until(lambda: all(p.loaded_models is not None for p in providers.values()))
    ids = {m["id"] for m in (await (await client.get("/v1/models")).json())["data"]}
    assert ids == {"fast", "gpt-4o-mini", "gpt-4o", "lmstudio/local-model", "lmstudio/qwen"}


# --------------------------------------------------------------------------- x-gateway-* everywhere
# The README promises x-gateway-provider, -attempts, -failover and x-request-id on every
# response: the gateway's own errors and its GET endpoints too, where nobody was tried.

NOBODY = {"x-gateway-provider": "none", "x-gateway-attempts": "0", "x-gateway-failover": "false"}


def assert_answered_by_the_gateway(resp, request_id=None):
    for name, value in NOBODY.items():
        assert resp.headers.get(name) == value, (name, dict(resp.headers))
    if request_id is None:
        assert len(resp.headers["x-request-id"]) == 32
    else:
        assert resp.headers["x-request-id"] == request_id


async def test_own_errors_carry_the_gateway_headers(gateway, upstreams):
    a = await upstreams("a")
    client = await gateway(a, settings={"max_body_bytes": 4096})
    json_headers = {"Content-Type": "application/json"}

    bad_json = await client.post("/v1/chat/completions", data=b"{oops", headers=json_headers)
    await check_error(bad_json, 400)
    assert_answered_by_the_gateway(bad_json)

    too_big = chat()
    too_big["messages"][0]["content"] = "x" * 10_000
    resp = await client.post(
        "/v1/chat/completions", json=too_big, headers={"x-request-id": "r-413"}
    )
    await check_error(resp, 413)
    assert_answered_by_the_gateway(resp, "r-413")

    resp = await client.get("/v1/nothing", headers={"x-request-id": "r-404"})
    await check_error(resp, 404)
    assert_answered_by_the_gateway(resp, "r-404")

    resp = await client.post(
        "/v1/chat/completions", json=chat(), headers={"x-gateway-timeout": "0"}
    )
    await check_error(resp, 400)
    assert_answered_by_the_gateway(resp)

    resp = await client.post(
        "/v1/chat/completions", data=b"{}", headers={**json_headers, "Expect": "nonsense"}
    )
    assert resp.status == 417
    assert_answered_by_the_gateway(resp)
    assert a.requests == []


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("GET", "/v1/chat/completions", {"POST"}), ("DELETE", "/v1/models", {"GET", "HEAD"})],
)
async def test_405_names_the_allowed_methods(gateway, upstreams, method, path, allowed):
    a = await upstreams("a")
    client = await gateway(a)
    resp = await client.request(method, path)
    err = await check_error(resp, 405)
    assert f"{method} {path}" in err["message"]
    assert {m.strip() for m in resp.headers["Allow"].split(",")} == allowed
    assert_answered_by_the_gateway(resp)


@pytest.mark.parametrize(
    "path", ["/healthz", "/readyz", "/v1/models", "/admin/providers", "/metrics"]
)
async def test_get_endpoints_carry_the_gateway_headers(gateway, upstreams, path):
    a = await upstreams("a")
    client = await gateway(a)
    resp = await client.get(path, headers={"x-request-id": "get-1"})
    assert resp.status == 200
    assert_answered_by_the_gateway(resp, "get-1")


async def test_denied_requests_carry_the_gateway_headers(gateway, upstreams):
    a = await upstreams("a")
    policy = AccessPolicy(client_keys=frozenset({digest("good-key")}))
    client = await gateway(a, settings={"access": policy})
    resp = await client.post("/v1/chat/completions", json=chat())
    await check_error(resp, 401)
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert_answered_by_the_gateway(resp)
    assert a.requests == []


async def test_proxied_answers_keep_their_own_headers(gateway, upstreams):
    a = await upstreams("a")
    client = await gateway(a)
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.status == 200
    assert resp.headers["x-gateway-provider"] == "openai"
    assert resp.headers["x-gateway-attempts"] == "1"
    assert resp.headers.getall("x-gateway-provider") == ["openai"]  # set once, not twice
