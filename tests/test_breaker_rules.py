"""Breakers fed from both sides at once (requests and probes at a short interval).

Each test drives a rule that holds only when requests and probes agree: probes never
shorten an open period the upstream asked for, a client's own deadline is not the
provider's failure, a half-open trial is released on every path and judged at its first
token, verdicts from before an opening move nothing, and rate limits stay 429.
"""

from __future__ import annotations

import asyncio

import orjson

from breakers import State
from gateway.server import PROVIDERS
from tests import fake_upstream as fu
from tests.conftest import chat
from tests.fake_upstream import wait_until
from tests.test_streaming import read_stream, text_of

PROBING = {"probes": True, "probe_interval": 0.05}


def breaker_of(client, name="openai"):
    return client.app[PROVIDERS][name].breaker


async def post(client, body=None, **kw):
    resp = await client.post("/v1/chat/completions", json=body or chat(), **kw)
    return resp, await resp.read()


async def probes_pass(up, n=5):
    """Wait until ``up`` has answered ``n`` more probes."""
    start = up.probes
    await wait_until(lambda: up.probes >= start + n)


# -- 7. probes never shorten an open period the upstream asked for ----------------------


async def test_good_probes_do_not_reopen_a_provider_out_of_quota(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.insufficient_quota()
    client = await gateway(a, b, **PROBING, quota_reset_timeout=60, max_retries=0)
    resp, _ = await post(client)
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert breaker_of(client).state is State.OPEN
    for _ in range(10):
        await probes_pass(a, 2)  # the model list answers 200 all along
        resp, _ = await post(client)
        assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert len(a.requests) == 1
    assert breaker_of(client).state is State.OPEN


async def test_good_probes_do_not_cut_short_a_retry_after(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.rate_limited(retry_after=30)
    client = await gateway(a, b, **PROBING, max_retries=0)
    await post(client)
    await probes_pass(a, 5)
    resp, _ = await post(client)
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert len(a.requests) == 1
    assert 25 < breaker_of(client).retry_in() <= 30


async def test_a_good_probe_half_opens_a_breaker_that_errors_opened(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.then(fu.server_error(500))
    client = await gateway(a, b, **PROBING, fail_max=1, reset_timeout=60, max_retries=0)
    resp, _ = await post(client)
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    await wait_until(lambda: breaker_of(client).state is State.HALF_OPEN)
    resp, _ = await post(client)  # the trial
    assert resp.headers["x-gateway-provider"] == "openai"
    assert breaker_of(client).state is State.CLOSED


# -- 8. a deadline the client chose is not the provider's failure -----------------------


async def test_client_deadlines_do_not_open_a_healthy_providers_breaker(gateway, upstreams):
    a = await upstreams("a")
    a.default = fu.ok(delay=0.3)
    client = await gateway(a, **PROBING, fail_max=3, reset_timeout=60)
    for stream in (False, True, False, True):
        resp, body = await post(client, chat(stream=stream), headers={"x-gateway-timeout": "0.1"})
        assert resp.status == 504
        assert orjson.loads(body)["error"]["code"] == "request_timeout"
    assert breaker_of(client).state is State.CLOSED
    assert breaker_of(client).fail_counter == 0
    resp, _ = await post(client)
    assert resp.status == 200 and resp.headers["x-gateway-provider"] == "openai"


async def test_a_deadline_spent_in_the_queue_is_504_and_not_a_failure(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.ok(delay=1.0)
    client = await gateway(
        a, b, fail_max=1, max_concurrency=1, max_queue=5, max_queue_wait=10, per={"lmstudio": {}}
    )
    b.default = fu.ok(delay=1.0)
    busy = asyncio.ensure_future(post(client))
    busy_b = asyncio.ensure_future(post(client, chat(model="lmstudio/local-model")))
    await wait_until(lambda: len(a.requests) == 1 and len(b.requests) == 1)
    resp, body = await post(client, headers={"x-gateway-timeout": "0.3"})
    assert resp.status == 504, body
    assert "deadline" in orjson.loads(body)["error"]["message"]
    assert breaker_of(client).fail_counter == 0
    await busy
    await busy_b


async def test_a_deadline_after_commit_is_not_the_providers_failure(gateway, upstreams):
    a = await upstreams("a")
    a.default = fu.stream(tokens=50, chunk_delay=0.05)
    client = await gateway(a, fail_max=1, idle_timeout=5)
    resp = await client.post(
        "/v1/chat/completions", json=chat(stream=True), headers={"x-gateway-timeout": "0.5"}
    )
    datas, done = await read_stream(resp)
    assert not done and "request deadline reached" in datas[-1]["error"]["message"]
    assert breaker_of(client).state is State.CLOSED and breaker_of(client).fail_counter == 0


# -- 9. a half-open trial permit is released on every path ------------------------------


def half_open(client, name="openai"):
    breaker = breaker_of(client, name)
    breaker.probe_failed(unreachable=True)
    breaker.probe_succeeded()
    assert breaker.state is State.HALF_OPEN


async def test_trial_released_when_its_client_leaves_the_queue(gateway, upstreams):
    a = await upstreams("a")
    a.default = fu.ok(delay=0.5)
    client = await gateway(a, max_concurrency=1, max_queue=5, max_queue_wait=10)
    provider = client.app[PROVIDERS]["openai"]
    first = asyncio.ensure_future(post(client))
    await wait_until(lambda: provider.limiter.in_use == 1)
    half_open(client)
    waiting = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat()))
    await wait_until(lambda: provider.limiter.queued == 1)
    waiting.cancel()  # the trial's client goes away while queued for a slot
    await wait_until(lambda: provider.limiter.queued == 0)
    await asyncio.sleep(0.05)
    assert provider.breaker.retry_in() == 0  # no phantom trial in flight
    resp, _ = await first
    assert resp.status == 200
    resp, _ = await post(client)  # the next request is the trial, and closes it
    assert resp.headers["x-gateway-provider"] == "openai"
    assert provider.breaker.state is State.CLOSED


async def test_trial_released_when_the_request_cannot_be_encoded(gateway, upstreams):
    class Broken:
        endpoints = frozenset({"chat/completions"})

        def request(self, call, model):
            raise TypeError("cannot encode")

    a, b = await upstreams("a"), await upstreams("b")
    client = await gateway(a, b)
    provider = client.app[PROVIDERS]["openai"]
    real = provider.dialect
    provider.dialect = Broken()
    half_open(client)
    resp, _ = await post(client)
    assert resp.status == 500  # a gateway bug answers 500, and frees what it held
    provider.dialect = real
    assert provider.breaker.retry_in() == 0 and provider.limiter.in_use == 0
    resp, _ = await post(client)
    assert resp.headers["x-gateway-provider"] == "openai"


# -- 10. results from before an opening do not move the breaker ------------------------


async def test_a_stream_admitted_before_a_quota_error_does_not_close_it(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.then(fu.stream(tokens=10, chunk_delay=0.1), fu.insufficient_quota())
    client = await gateway(a, b, quota_reset_timeout=60, max_retries=0)
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert resp.headers["x-gateway-provider"] == "openai"
    quota, _ = await post(client)  # opens the breaker for 60 s while the stream runs
    assert quota.headers["x-gateway-provider"] == "lmstudio"
    assert breaker_of(client).state is State.OPEN
    datas, done = await read_stream(resp)
    assert done and text_of(datas)
    assert breaker_of(client).state is State.OPEN  # the stream's success moved nothing


async def test_a_late_failure_does_not_reopen_during_anothers_trial(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    cut, answer = asyncio.Event(), asyncio.Event()
    a.then(fu.drop_after(5), fu.server_error(500), fu.ok(gate=answer))
    a.script[0].gate = cut
    client = await gateway(a, b, fail_max=1, reset_timeout=60, max_retries=0)
    old = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(stream=True)))
    await wait_until(lambda: len(a.requests) == 1)  # admitted while closed
    await post(client)  # 500: opens
    half_open(client)
    trial = asyncio.ensure_future(post(client))
    await wait_until(lambda: len(a.requests) == 3)
    cut.set()  # the old stream fails while the trial is in flight
    datas, done = await read_stream(await old)
    assert not done and datas[-1]["error"]["code"] == "stream_interrupted"
    assert breaker_of(client).state is State.HALF_OPEN
    answer.set()
    resp, _ = await trial
    assert resp.headers["x-gateway-provider"] == "openai"
    assert breaker_of(client).state is State.CLOSED


async def test_a_trial_stream_is_judged_at_its_first_token(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.stream(tokens=20, chunk_delay=0.1)
    client = await gateway(a, b)
    half_open(client)
    long = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert long.headers["x-gateway-provider"] == "openai"
    await long.content.readany()  # committed: its first token is here
    assert breaker_of(client).state is State.CLOSED
    resp, _ = await post(client, chat(stream=False))
    assert resp.headers["x-gateway-provider"] == "openai"  # not held back by the trial
    datas, done = await read_stream(long)
    assert done


# -- 11. while every provider is rate limited the answer stays 429 ---------------------


async def test_all_rate_limited_is_429_for_later_requests_too(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = b.default = fu.rate_limited(retry_after=30)
    client = await gateway(a, b, **PROBING, max_retries=0)
    for _ in range(3):
        resp, body = await post(client)
        assert resp.status == 429, body
        assert orjson.loads(body)["error"]["code"] == "rate_limit_exceeded"
        assert 25 <= int(resp.headers["Retry-After"]) <= 37  # 30 s, jittered up to +20 %
    assert len(a.requests) == 1 and len(b.requests) == 1


async def test_rate_limited_and_down_is_503(gateway, upstreams, refused_url):
    a = await upstreams("a")
    a.default = fu.rate_limited(retry_after=30)
    client = await gateway(a, refused_url, max_retries=0)
    for _ in range(2):
        resp, body = await post(client)
        assert resp.status == 503, body
        assert "Connection refused" in orjson.loads(body)["error"]["message"]
