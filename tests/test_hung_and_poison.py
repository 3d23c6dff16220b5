"""Hung providers are routed around; poison requests do not take providers down.

A provider that stops without dying (accepts connections, answers nothing, its model
list hangs too) is told apart from a busy one by progress; a request that every provider
refuses alike is the request's fault; long healthy streams are not cut by the request
deadline; backoff is one budget per request. Assertions are on outcomes, counts and
breaker states, never on timings.
"""

from __future__ import annotations

import asyncio
import logging
import random

import orjson

from breakers import STALLED_KIND, State
from gateway.server import PROVIDERS
from tests import fake_upstream as fu
from tests.conftest import chat
from tests.fake_upstream import wait_until
from tests.test_streaming import read_stream, text_of

HUNG_PROBES = {"probes": True, "probe_interval": 0.05, "probe_timeout": 0.2}


def provider(client, name="openai"):
    return client.app[PROVIDERS][name]


async def post(client, body=None, **kw):
    resp = await client.post("/v1/chat/completions", json=body or chat(), **kw)
    return resp, await resp.read()


def hung(up):
    """Accepts every connection, answers nothing; the model list hangs as well."""
    up.default = fu.silent()
    up.models_delay = 3600


# -- 1. a hung provider is routed around ---------------------------------------------------


async def test_a_hung_provider_is_found_and_its_waiting_request_fails_over(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    hung(a)
    client = await gateway(
        a, b, **HUNG_PROBES, per={"openai": {"fail_max": 3}}, first_token_timeout=60
    )
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    datas, done = await read_stream(resp)
    # answered by the fallback once the probes showed no progress, not after 60 s
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert done and text_of(datas) == b.text
    breaker = provider(client).breaker
    assert breaker.state is State.OPEN and breaker.cause.kind == STALLED_KIND
    resp, _ = await post(client)  # later requests skip it
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert len(a.requests) == 1


async def test_a_busy_provider_is_not_a_hung_one(gateway, upstreams):
    """Streams still producing while the model list times out: busy, not failed."""
    a = await upstreams("a")
    a.default = fu.stream(tokens=15, chunk_delay=0.1)
    client = await gateway(a, **HUNG_PROBES, fail_max=2)
    resps = [await client.post("/v1/chat/completions", json=chat(stream=True)) for _ in range(2)]
    a.models_delay = 3600  # like llama.cpp: no model list while it generates
    probes = a.probes
    results = [await read_stream(r) for r in resps]
    expected = "".join(fu.WORDS[i % len(fu.WORDS)] for i in range(15))
    assert all(done and text_of(datas) == expected for datas, done in results)
    assert a.probes >= probes + 4  # several probes timed out while the streams ran
    assert provider(client).breaker.fail_counter == 0


async def test_a_stream_on_a_long_prompt_is_busy_not_hung(gateway, upstreams):
    """llama.cpp's model list hangs while it works: a stream that has its headers and no
    token yet (a long prompt) is not a hang."""
    a = await upstreams("a")
    client = await gateway(a, **HUNG_PROBES, fail_max=1, first_token_timeout=10)
    await wait_until(lambda: a.probes >= 1)
    a.models_delay = 3600
    a.then(fu.stream(delay=1.5))
    probes = a.probes
    resp, raw = await post(client, chat(stream=True))
    assert a.probes >= probes + 3  # probes timed out all along
    assert resp.status == 200 and raw.endswith(b"data: [DONE]\n\n")
    assert provider(client).breaker.fail_counter == 0


async def test_a_client_giving_up_on_a_silent_provider_is_evidence(gateway, upstreams, caplog):
    caplog.set_level(logging.INFO, logger="gateway")
    a = await upstreams("a")
    a.default = fu.silent()
    client = await gateway(
        a, stall_timeout=0.3, first_token_timeout=60, response_timeout=60, fail_max=1
    )
    task = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat()))
    await wait_until(lambda: len(a.requests) == 1)
    await asyncio.sleep(0.5)
    task.cancel()
    breaker = provider(client).breaker
    await wait_until(lambda: breaker.state is State.OPEN)
    assert breaker.fail_counter == 1 and breaker.cause.kind == STALLED_KIND
    line = await_line(caplog, "outcome=cancelled")
    assert "waiting_on=openai" in line and "attempts=1" in line and "chain=openai:cancelled" in line


def await_line(caplog, needle):
    for record in caplog.records:
        if needle in record.getMessage():
            return record.getMessage()
    raise AssertionError(f"no log line with {needle!r}")


async def test_streams_that_spend_their_share_on_a_hung_provider_are_evidence(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    hung(a)
    client = await gateway(a, b, stall_timeout=0.3, fail_max=2, first_token_timeout=30)
    for _ in range(2):
        resp, _ = await post(client, chat(stream=True), headers={"x-gateway-timeout": "1"})
        assert resp.headers["x-gateway-provider"] == "lmstudio"
    breaker = provider(client).breaker
    assert breaker.state is State.OPEN and breaker.cause.kind == STALLED_KIND
    resp, _ = await post(client, chat(stream=True), headers={"x-gateway-timeout": "1"})
    assert resp.headers["x-gateway-attempts"] == "2"  # skipped at once now
    assert len(a.requests) == 2


async def test_an_impatient_client_is_not_evidence(gateway, upstreams):
    a = await upstreams("a")
    a.default = fu.ok(delay=1)
    client = await gateway(a, stall_timeout=10)
    task = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat()))
    await wait_until(lambda: len(a.requests) == 1)
    task.cancel()
    await wait_until(lambda: a.disconnects == 1)
    assert provider(client).breaker.fail_counter == 0


async def test_a_client_deadline_leaves_time_for_the_fallback(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    hung(a)
    client = await gateway(a, b, first_token_timeout=30, response_timeout=30, stall_timeout=5)
    for stream in (False, True):
        resp, body = await post(client, chat(stream=stream), headers={"x-gateway-timeout": "2"})
        assert resp.status == 200, body
        assert resp.headers["x-gateway-provider"] == "lmstudio"
    # the primary's share ran out, which is not a failure of its own timeout
    assert provider(client).breaker.fail_counter == 0


# -- 2. one bad request does not take every provider down -----------------------------

LLAMA_REFUSAL = "Unsupported param: response_format type 'json_schema' is not supported"


def refuses(up, message=LLAMA_REFUSAL, status=500):
    up.default = fu.openai_error(status, message, "server_error", None)


async def test_a_request_every_provider_refuses_alike_is_answered_as_is(gateway, upstreams):
    a, b, c = await upstreams("a"), await upstreams("b"), await upstreams("c")
    refuses(a)
    refuses(b, LLAMA_REFUSAL.replace("json_schema", "json_object"))  # same shape
    client = await gateway(a, b, c, fail_max=3)
    body = chat(response_format={"type": "json_schema"})
    resp, raw = await post(client, body)
    assert resp.status == 500
    assert orjson.loads(raw)["error"]["message"] == LLAMA_REFUSAL.replace(
        "json_schema", "json_object"
    )
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert len(a.requests) == len(b.requests) == 1  # no retry of a request's fault
    assert c.requests == []  # no further failover: the request is at fault
    assert provider(client).breaker.fail_counter == 0
    assert provider(client, "lmstudio").breaker.fail_counter == 0


async def test_twenty_poison_requests_leave_plain_chat_on_the_primary(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    client = await gateway(a, b, fail_max=2)
    poison = chat(response_format={"type": "json_schema"})
    for _ in range(20):
        a.then(fu.openai_error(500, LLAMA_REFUSAL, "server_error", None))
        b.then(fu.openai_error(500, LLAMA_REFUSAL, "server_error", None))
        resp, _ = await post(client, poison)
        assert resp.status == 500
    resp, raw = await post(client)
    assert resp.status == 200
    assert resp.headers["x-gateway-provider"] == "openai"
    assert provider(client).breaker.state is State.CLOSED


async def test_a_refusal_that_the_fallback_answers_is_the_primarys_failure(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    refuses(a)
    client = await gateway(a, b)
    resp, _ = await post(client)
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert len(a.requests) == 1  # not retried
    assert provider(client).breaker.fail_counter == 1  # charged once the request was over


async def test_different_server_errors_still_fail_over(gateway, upstreams):
    a, b, c = await upstreams("a"), await upstreams("b"), await upstreams("c")
    refuses(a)
    refuses(b, "Invalid value for 'temperature': must be at most 2")
    client = await gateway(a, b, c)
    resp, _ = await post(client)
    assert resp.status == 200 and resp.headers["x-gateway-provider"] == "ollama"
    assert provider(client).breaker.fail_counter == 1
    assert provider(client, "lmstudio").breaker.fail_counter == 1


# -- 3. healthy long streams are not cut by the request deadline ---------------------------


async def test_a_stream_longer_than_the_request_timeout_completes(gateway, upstreams):
    a = await upstreams("a")
    a.default = fu.stream(tokens=30, chunk_delay=0.1)  # about 3 s
    client = await gateway(a, settings={"request_timeout": 1.0}, idle_timeout=5)
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    datas = []
    async for piece in resp.content.iter_any():  # a slow reader
        datas.append(piece)
        await asyncio.sleep(0.05)
    raw = b"".join(datas)
    assert raw.endswith(b"data: [DONE]\n\n") and b"stream_interrupted" not in raw
    assert provider(client).breaker.fail_counter == 0


async def test_max_stream_duration_ends_a_stream_without_blaming_the_provider(gateway, upstreams):
    a = await upstreams("a")
    a.default = fu.stream(tokens=100, chunk_delay=0.05)
    client = await gateway(a, settings={"max_stream_duration": 0.5}, fail_max=1)
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    datas, done = await read_stream(resp)
    assert not done and "request deadline reached" in datas[-1]["error"]["message"]
    assert provider(client).breaker.state is State.CLOSED


# -- 4. smaller --------------------------------------------------------------------------


async def test_a_request_sleeps_through_backoff_at_most_once(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = b.default = fu.rate_limited(retry_after=1)
    client = await gateway(a, b, fail_max=10, max_retries=2, max_retry_wait=1.5)
    resp, _ = await post(client)
    assert resp.status == 429
    # one sleep of 1 s on the primary; after it the budget cannot cover another
    assert len(a.requests) == 2 and len(b.requests) == 1


async def test_retry_after_of_a_refusal_is_jittered(gateway, upstreams):
    random.seed(7)
    a = await upstreams("a")
    a.default = fu.rate_limited(retry_after=30)
    client = await gateway(a, max_retries=0)
    seen = set()
    for _ in range(10):
        resp, _ = await post(client)
        assert resp.status == 429
        seen.add(int(resp.headers["Retry-After"]))
    assert len(seen) > 1 and min(seen) >= 25 and max(seen) <= 37
