"""Retries, backoff, Retry-After, one deadline per request, limits, cancellation."""

from __future__ import annotations

import asyncio
import time

import orjson

from gateway.server import PROVIDERS
from tests import fake_upstream as fu
from tests.conftest import chat
from tests.fake_upstream import wait_until


async def post(client, body=None, **kw):
    resp = await client.post("/v1/chat/completions", json=body or chat(), **kw)
    return resp, await resp.read()


class Stamped(fu.FakeUpstream):
    """Records when each request arrived."""

    async def _handle(self, request):
        self.times = getattr(self, "times", [])
        self.times.append(time.monotonic())
        return await super()._handle(request)


async def stamped(name):
    up = Stamped(name)
    await up.start()
    return up


async def test_retry_after_one_second_is_honoured(gateway, upstreams):
    a, b = await stamped("a"), await upstreams("b")
    try:
        a.then(fu.rate_limited(retry_after=1))
        client = await gateway(a, b, max_retry_wait=2)
        resp, _ = await post(client)
        assert resp.headers["x-gateway-provider"] == "openai"
        assert resp.headers["x-gateway-attempts"] == "2"
        assert len(a.times) == 2 and b.requests == []
        assert a.times[1] - a.times[0] >= 0.95  # it waited as asked, not less
    finally:
        await a.stop()


async def test_retry_after_ms_is_honoured(gateway, upstreams):
    a = await upstreams("a")
    limited = fu.rate_limited()
    limited.headers = {"retry-after-ms": "150"}
    a.then(limited)
    client = await gateway(a)
    resp, _ = await post(client)
    assert resp.headers["x-gateway-provider"] == "openai"
    assert len(a.requests) == 2


async def test_long_retry_after_fails_over_without_sleeping(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = b.default = fu.rate_limited(retry_after=30)
    client = await gateway(a, b, max_retries=5)
    resp, body = await post(client)
    assert resp.status == 429
    msg = orjson.loads(body)["error"]["message"]
    assert "backoff" not in msg  # no attempt slept
    assert len(a.requests) == 1 and len(b.requests) == 1


async def test_backoff_waits_are_listed_in_the_final_error(gateway, upstreams):
    a = await upstreams("a")
    a.default = fu.server_error(503)
    client = await gateway(a, max_retries=2, backoff_base=0.02, backoff_max=0.05)
    resp, body = await post(client)
    assert resp.status == 503
    assert resp.headers["x-gateway-attempts"] == "3"
    msg = orjson.loads(body)["error"]["message"]
    assert msg.count("OpenAI: server_error") == 3
    assert len(a.requests) == 3


async def test_silent_upstream_fails_over_after_first_token_timeout(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.silent()
    client = await gateway(
        a, b, per={"openai": {"first_token_timeout": 0.3, "response_timeout": 0.3}}
    )
    for stream in (True, False):
        resp, _ = await post(client, chat(stream=stream))
        assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert len(a.requests) == 2  # one per request: a timeout is never retried there
    await wait_until(lambda: a.disconnects == 2)


async def test_one_deadline_covers_every_provider(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = b.default = fu.silent()
    client = await gateway(a, b, first_token_timeout=30, response_timeout=30)
    resp, body = await post(client, chat(stream=True), headers={"x-gateway-timeout": "0.5"})
    assert resp.status == 504
    err = orjson.loads(body)["error"]
    assert err["code"] == "request_timeout"
    # the first provider had half the time, so that the second one got the rest
    assert "OpenAI: budget_spent (no answer within its 0.2s share)" in err["message"]
    assert "LM Studio: deadline (request deadline reached)" in err["message"]
    assert len(a.requests) == len(b.requests) == 1  # each had its part of the deadline


async def test_excess_requests_move_to_the_fallback(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.ok(delay=0.3)
    client = await gateway(a, b, per={"openai": {"max_concurrency": 2, "max_queue": 0}})
    results = await asyncio.gather(*(post(client) for _ in range(10)))
    by = [r.headers["x-gateway-provider"] for r, _ in results]
    assert by.count("openai") == 2 and by.count("lmstudio") == 8
    assert all(r.status == 200 for r, _ in results)


async def test_every_provider_full_is_429(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = b.default = fu.ok(delay=0.3)
    client = await gateway(a, b, max_concurrency=1, max_queue=1, max_queue_wait=0.05)
    results = await asyncio.gather(*(post(client) for _ in range(6)))
    statuses = sorted(r.status for r, _ in results)
    assert statuses.count(200) >= 2 and 429 in statuses
    for r, body in results:
        if r.status == 429:
            assert r.headers["Retry-After"] == "1"
            assert "provider_full" in orjson.loads(body)["error"]["message"]
    providers = client.app[PROVIDERS]
    assert all(p.limiter.in_use == 0 and p.limiter.queued == 0 for p in providers.values())


async def test_queue_is_first_come_first_served(gateway, upstreams):
    a = await upstreams("a")
    a.then(fu.ok(delay=0.5))  # the first request holds the only slot while the rest queue
    client = await gateway(a, max_concurrency=1, max_queue=10, max_queue_wait=5)
    limiter = client.app[PROVIDERS]["openai"].limiter

    def body(i):
        b = chat()
        b["messages"][0]["content"] = str(i)
        return b

    tasks = [asyncio.ensure_future(post(client, body(0)))]
    await wait_until(lambda: len(a.requests) == 1)
    for i in range(1, 5):
        tasks.append(asyncio.ensure_future(post(client, body(i))))
        await wait_until(lambda i=i: limiter.queued == i)
    results = await asyncio.gather(*tasks)
    assert all(r.status == 200 for r, _ in results)
    assert [r["messages"][0]["content"] for r in a.requests] == ["0", "1", "2", "3", "4"]


async def cancel_in_flight(client, body, ready):
    task = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
    await wait_until(ready)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


async def test_disconnect_during_backoff_frees_the_slot(gateway, upstreams):
    a = await upstreams("a")
    busy = fu.server_error(503)
    busy.headers = {"Retry-After": "1.5"}  # a 503 asking for a wait: backoff, breaker closed
    a.then(busy)
    client = await gateway(a, max_concurrency=1, max_retry_wait=2, max_queue=0)
    limiter = client.app[PROVIDERS]["openai"].limiter
    await cancel_in_flight(client, chat(), lambda: len(a.requests) == 1)
    await wait_until(lambda: limiter.in_use == 0)
    resp, _ = await post(client)  # the slot is free for the next request
    assert resp.headers["x-gateway-provider"] == "openai"


async def test_disconnect_while_queued_leaves_the_queue(gateway, upstreams):
    a = await upstreams("a")
    a.default = fu.ok(delay=0.5)
    client = await gateway(a, max_concurrency=1, max_queue=5, max_queue_wait=10)
    limiter = client.app[PROVIDERS]["openai"].limiter
    first = asyncio.ensure_future(post(client))
    await wait_until(lambda: limiter.in_use == 1)
    await cancel_in_flight(client, chat(), lambda: limiter.queued == 1)
    await wait_until(lambda: limiter.queued == 0)
    resp, _ = await first
    assert resp.status == 200
    assert len(a.requests) == 1
    assert limiter.in_use == 0


async def test_disconnect_while_waiting_for_first_token_frees_the_slot(gateway, upstreams):
    a = await upstreams("a")
    a.then(fu.stream(delay=30))
    client = await gateway(a, max_concurrency=1, max_queue=0, first_token_timeout=60)
    limiter = client.app[PROVIDERS]["openai"].limiter
    await cancel_in_flight(client, chat(stream=True), lambda: len(a.requests) == 1)
    await wait_until(lambda: a.disconnects == 1 and limiter.in_use == 0)
    resp, _ = await post(client, chat(stream=True))
    assert resp.headers["x-gateway-provider"] == "openai"


async def test_disconnect_while_reading_a_non_stream_answer(gateway, upstreams):
    a = await upstreams("a")
    a.then(fu.ok(delay=30))
    client = await gateway(a, max_concurrency=1, max_queue=0, response_timeout=60)
    limiter = client.app[PROVIDERS]["openai"].limiter
    breaker = client.app[PROVIDERS]["openai"].breaker
    await cancel_in_flight(client, chat(), lambda: len(a.requests) == 1)
    await wait_until(lambda: a.disconnects == 1 and limiter.in_use == 0)
    assert breaker.fail_counter == 0  # the client leaving is not the provider's failure
    resp, _ = await post(client)
    assert resp.status == 200
