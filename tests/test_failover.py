"""Non-streaming failover: each outcome class against fake upstreams on loopback."""

from __future__ import annotations

import logging

import orjson
from prometheus_client import REGISTRY

from gateway.server import PROVIDERS
from tests import fake_upstream as fu
from tests.conftest import PROVIDER_KEY, chat


async def post(client, body=None, **kw):
    resp = await client.post("/v1/chat/completions", json=body or chat(), **kw)
    return resp, await resp.read()


async def test_primary_answers(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    client = await gateway(a, b)
    resp, body = await post(client, headers={"x-request-id": "req-123"})
    assert resp.status == 200
    assert orjson.loads(body)["choices"][0]["message"]["content"] == a.text
    assert resp.headers["x-gateway-provider"] == "openai"
    assert resp.headers["x-gateway-attempts"] == "1"
    assert resp.headers["x-gateway-failover"] == "false"
    assert resp.headers["x-request-id"] == "req-123"
    assert resp.headers["x-ratelimit-remaining-requests"] == "99"  # upstream headers pass
    assert len(b.requests) == 0
    # OpenAI gets the client's model; the provider's own key, never the client's
    assert a.requests[0]["model"] == "gpt-4o-mini"
    assert a.headers[0]["Authorization"] == f"Bearer {PROVIDER_KEY}"


async def test_body_passes_through_untouched(gateway, upstreams):
    a = await upstreams("a")
    client = await gateway(a)
    raw = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "x_unknown": {"k": [1, 2]}}'
    resp = await client.post(
        "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 200
    assert a.requests[0]["x_unknown"] == {"k": [1, 2]}


async def test_rate_limit_fails_over_to_lmstudio(gateway, upstreams, caplog):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.rate_limited(retry_after=30)
    client = await gateway(a, b)
    with caplog.at_level(logging.INFO, logger="gateway"):
        resp, body = await post(client)
    assert resp.status == 200
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert resp.headers["x-gateway-failover"] == "true"
    assert len(a.requests) == 1  # Retry-After 30 s is over max_retry_wait: no retry
    assert b.requests[0]["model"] == "local-model"  # LMSTUDIO_MODEL, not the client's name
    assert "OpenAI rate limit exceeded, failing over to LM Studio" in caplog.text
    assert "Using LM Studio (failover)" in caplog.text
    assert PROVIDER_KEY not in caplog.text


async def test_rate_limit_retries_same_provider_first(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.then(fu.rate_limited(), fu.rate_limited())
    client = await gateway(a, b, max_retries=2)
    resp, _ = await post(client)
    assert resp.headers["x-gateway-provider"] == "openai"
    assert resp.headers["x-gateway-attempts"] == "3"
    assert len(a.requests) == 3 and len(b.requests) == 0


async def test_insufficient_quota_fails_over_at_once(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.insufficient_quota()
    client = await gateway(a, b, max_retries=3)
    resp, _ = await post(client)
    assert resp.status == 200
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert len(a.requests) == 1


async def test_server_errors_retry_then_fail_over(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.server_error(503)
    client = await gateway(a, b, max_retries=1)
    resp, _ = await post(client)
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert len(a.requests) == 2
    assert resp.headers["x-gateway-attempts"] == "3"


async def test_connection_refused_fails_over(gateway, upstreams, refused_url):
    b = await upstreams("b")
    client = await gateway(refused_url, b)
    resp, _ = await post(client)
    assert resp.status == 200
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert resp.headers["x-gateway-attempts"] == "2"


async def test_hang_up_before_response_fails_over(gateway, upstreams):
    """A server that reads the request and hangs up on a new connection is one attempt."""
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.hang_up()
    client = await gateway(a, b, max_retries=0)
    resp, _ = await post(client)
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert resp.headers["x-gateway-attempts"] == "2"
    assert len(a.requests) == 1  # a POST is sent once per attempt


async def test_silent_then_hang_up_is_one_attempt(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.hang_up(after=0.5)
    client = await gateway(a, b, max_retries=0)
    resp, _ = await post(client)
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert len(a.requests) == 1


async def test_stale_pooled_connection_is_resent_once_visibly(gateway, upstreams):
    """A pooled connection that fails before any response byte: resent once, not a
    failure of the provider, and shown in the attempts and the metrics."""
    a, b = await upstreams("a"), await upstreams("b")
    client = await gateway(a, b, max_retries=0, fail_max=1)
    before = (
        REGISTRY.get_sample_value(
            "gateway_upstream_attempts_total", {"provider": "openai", "outcome": "stale_connection"}
        )
        or 0.0
    )
    await post(client)  # leaves a kept-alive connection in the pool
    assert a.connections == 1
    a.then(fu.hang_up(), fu.ok())  # the pooled connection dies under the next request
    resp, body = await post(client)
    assert resp.status == 200
    assert resp.headers["x-gateway-provider"] == "openai"
    assert resp.headers["x-gateway-attempts"] == "2"
    assert len(a.requests) == 3 and a.connections == 2
    assert client.app[PROVIDERS]["openai"].breaker.fail_counter == 0
    after = REGISTRY.get_sample_value(
        "gateway_upstream_attempts_total", {"provider": "openai", "outcome": "stale_connection"}
    )
    assert after == before + 1


async def test_pooled_connection_failing_twice_is_not_resent_again(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    client = await gateway(a, b, max_retries=0)
    await post(client)
    a.default = fu.hang_up()
    resp, _ = await post(client)
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert len(a.requests) == 3  # the first answer, then the request and one resend


async def test_auth_failed_fails_over(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.openai_error(
        401, "Incorrect API key provided", "invalid_request_error", "invalid_api_key"
    )
    client = await gateway(a, b)
    resp, body = await post(client)
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert len(a.requests) == 1


async def test_bad_request_is_not_failed_over(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.bad_request()
    client = await gateway(a, b)
    resp, body = await post(client)
    assert resp.status == 400
    assert orjson.loads(body) == a.default.body  # the upstream's own error, as is
    assert resp.headers["x-gateway-provider"] == "openai"
    assert len(b.requests) == 0


async def test_content_refused_returns_exactly_one_attempt(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.content_refused()
    client = await gateway(a, b, max_retries=3)
    resp, body = await post(client)
    assert resp.status == 400
    assert orjson.loads(body)["error"]["code"] == "content_policy_violation"
    assert len(a.requests) == 1 and len(b.requests) == 0


async def test_context_too_long_tries_the_next_window(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.context_too_long()
    client = await gateway(a, b)
    resp, _ = await post(client)
    assert resp.status == 200
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert len(a.requests) == 1


async def test_context_too_long_everywhere_is_the_upstreams_400(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = b.default = fu.context_too_long()
    client = await gateway(a, b)
    resp, body = await post(client)
    assert resp.status == 400
    assert orjson.loads(body)["error"]["code"] == "context_length_exceeded"


async def test_model_missing_fails_over_without_breaker_failure(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.openai_error(
        404, "The model `x` does not exist", "invalid_request_error", "model_not_found"
    )
    client = await gateway(a, b, fail_max=1)
    for _ in range(3):
        resp, _ = await post(client)
        assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert len(a.requests) == 3  # never opened: model_missing is not the provider's failure


async def test_all_fail_gives_503_listing_every_attempt(gateway, upstreams, refused_url):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.server_error(502)
    b.default = fu.insufficient_quota()
    client = await gateway(a, b, refused_url, max_retries=0)
    resp, body = await post(client)
    assert resp.status == 503
    err = orjson.loads(body)["error"]
    assert err["type"] == "server_error" and err["code"] == "all_providers_failed"
    msg = err["message"]
    assert "OpenAI: server_error (502" in msg
    assert "LM Studio: quota_exhausted" in msg
    assert "Ollama: unreachable" in msg
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.headers["x-gateway-attempts"] == "3"
    assert resp.headers["x-gateway-provider"] == "none"


async def test_all_rate_limited_gives_429(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.rate_limited(retry_after=20)
    b.default = fu.rate_limited(retry_after=7)
    client = await gateway(a, b)
    resp, body = await post(client)
    assert resp.status == 429
    assert orjson.loads(body)["error"]["code"] == "rate_limit_exceeded"
    # the earliest a provider may take a request (7 s), jittered by up to +20 %
    assert 7 <= int(resp.headers["Retry-After"]) <= 9


async def test_pinned_provider_goes_first(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    client = await gateway(a, b)
    resp, _ = await post(client, chat(model="lmstudio/qwen2.5-7b"))
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert b.requests[0]["model"] == "qwen2.5-7b"


async def test_alias(gateway, upstreams):
    a = await upstreams("a")
    client = await gateway(a, aliases={"fast": "gpt-4o-mini"})
    resp, _ = await post(client, chat(model="fast"))
    assert resp.status == 200
    assert a.requests[0]["model"] == "gpt-4o-mini"


async def test_embeddings_and_completions_fail_over(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.server_error(500)
    client = await gateway(a, b, max_retries=0)
    resp = await client.post(
        "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "hi"}
    )
    assert resp.status == 200
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert (await resp.json())["data"][0]["embedding"] == [0.1, 0.2]
    resp = await client.post(
        "/v1/completions", json={"model": "gpt-3.5-turbo-instruct", "prompt": "hi"}
    )
    assert resp.status == 200
    assert resp.headers["x-gateway-provider"] == "lmstudio"


async def test_invalid_json_from_upstream_fails_over(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.Behaviour("error", status=200, body=None)  # 200 with body "null"
    client = await gateway(a, b)
    resp, body = await post(client)
    assert resp.status == 200
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert orjson.loads(body)["choices"]
