"""Streams: invisible failover before the first token, honest endings after it."""

from __future__ import annotations

import asyncio

import orjson

from gateway.sse import SSEParser
from tests import fake_upstream as fu
from tests.conftest import chat
from tests.fake_upstream import wait_until


async def read_stream(resp):
    """The events of an SSE response: (list of parsed data, saw [DONE])."""
    parser = SSEParser()
    datas = []
    done = False
    async for piece in resp.content.iter_any():
        for event in parser.feed(piece):
            if event.data is None:
                continue
            if event.data == b"[DONE]":
                done = True
            else:
                datas.append(orjson.loads(event.data))
    return datas, done


def text_of(datas):
    return "".join(
        (c.get("delta") or {}).get("content") or "" for d in datas for c in d.get("choices", [])
    )


async def stream(client, **kw):
    resp = await client.post("/v1/chat/completions", json=chat(stream=True, **kw))
    datas, done = await read_stream(resp)
    return resp, datas, done


async def test_stream_passes_through(gateway, upstreams):
    a = await upstreams("a")
    client = await gateway(a)
    resp, datas, done = await stream(client)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    assert resp.headers["x-gateway-provider"] == "openai"
    assert done
    assert text_of(datas) == a.text
    assert datas[0]["choices"][0]["delta"]["role"] == "assistant"  # the held role chunk
    assert datas[-1]["choices"][0]["finish_reason"] == "stop"


async def test_stream_bytes_are_forwarded_verbatim(gateway, upstreams):
    a = await upstreams("a")
    raw = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\r\n\r\n: ping\r\n\r\ndata: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\r\n\r\ndata: [DONE]\r\n\r\n'
    a.default = fu.sse(raw, role_chunk=False)
    client = await gateway(a)
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert await resp.read() == raw


async def test_error_status_before_stream_fails_over(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.rate_limited(retry_after=60)
    client = await gateway(a, b)
    resp, datas, done = await stream(client)
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert resp.headers["x-gateway-failover"] == "true"
    assert done and text_of(datas) == b.text


async def test_server_error_and_quota_before_stream_fail_over(gateway, upstreams):
    a, b, c = await upstreams("a"), await upstreams("b"), await upstreams("c")
    a.default = fu.server_error(500)
    b.default = fu.insufficient_quota()
    client = await gateway(a, b, c, max_retries=0)
    resp, datas, done = await stream(client)
    assert resp.headers["x-gateway-provider"] == "ollama"
    assert done and text_of(datas) == c.text


async def test_connection_refused_before_stream(gateway, upstreams, refused_url):
    b = await upstreams("b")
    client = await gateway(refused_url, b)
    resp, datas, done = await stream(client)
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert done and text_of(datas) == b.text


async def test_drop_after_200_before_any_token(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.drop_after(0, role_chunk=False)
    client = await gateway(a, b)
    resp, datas, done = await stream(client)
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert done and text_of(datas) == b.text
    assert len(datas) == len(fu.WORDS) + 2  # nothing of the failed attempt leaked


async def test_role_only_chunk_then_drop_fails_over(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.drop_after(0, role_chunk=True)
    client = await gateway(a, b)
    resp, datas, done = await stream(client)
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert done and text_of(datas) == b.text
    assert [d["choices"][0]["delta"].get("role") for d in datas].count("assistant") == 1


async def test_stream_ending_early_without_token_fails_over(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.sse(b"data: [DONE]\n\n")
    client = await gateway(a, b)
    resp, datas, done = await stream(client)
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert done and text_of(datas) == b.text
    assert len(datas) == len(fu.WORDS) + 2  # nothing of the failed attempt leaked


async def test_slow_first_token_fails_over(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.stream(delay=30)
    client = await gateway(a, b, per={"openai": {"first_token_timeout": 0.3}})
    resp, datas, done = await stream(client)
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert done and text_of(datas) == b.text
    await wait_until(lambda: a.disconnects == 1)  # the slow attempt was hung up on


async def test_malformed_sse_before_token_fails_over(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.sse(b"data: {not json\n\n")
    client = await gateway(a, b)
    resp, datas, done = await stream(client)
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert done and text_of(datas) == b.text


async def test_error_event_before_token_fails_over(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.sse(
        b'data: {"error": {"message": "overloaded", "type": "server_error", "code": null}}\n\n'
    )
    client = await gateway(a, b)
    resp, datas, done = await stream(client)
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert done and text_of(datas) == b.text


async def test_bad_request_stream_is_not_failed_over(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.bad_request()
    client = await gateway(a, b)
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert len(b.requests) == 0


async def test_drop_after_ten_tokens_ends_with_error_event(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.drop_after(10)
    client = await gateway(a, b)
    resp, datas, done = await stream(client)
    assert resp.status == 200
    assert resp.headers["x-gateway-provider"] == "openai"
    assert not done  # a cut answer is never presented as complete
    assert "error" in datas[-1]
    assert datas[-1]["error"]["code"] == "stream_interrupted"
    assert sum(1 for d in datas if "error" in d) == 1
    assert len(text_of(datas[:-1])) > 0
    assert [
        c for d in datas[:-1] for c in d["choices"] if c["delta"].get("content")
    ].__len__() == 10
    assert len(b.requests) == 0


async def test_stall_after_commit_ends_with_error_event(gateway, upstreams):
    a = await upstreams("a")
    a.default = fu.stall_after(3)
    client = await gateway(a, idle_timeout=0.3)
    resp, datas, done = await stream(client)
    assert not done
    assert "no event for 0.3s" in datas[-1]["error"]["message"]
    await wait_until(lambda: a.disconnects == 1)


async def test_missing_done_after_finish_is_completed(gateway, upstreams):
    a = await upstreams("a")
    a.default = fu.stream(done=False)
    client = await gateway(a)
    resp, datas, done = await stream(client)
    assert done
    assert not any("error" in d for d in datas)
    assert text_of(datas) == a.text


async def test_end_without_finish_reason_is_an_error(gateway, upstreams):
    a = await upstreams("a")
    a.default = fu.stream(done=False, finish=False)
    client = await gateway(a)
    resp, datas, done = await stream(client)
    assert not done
    assert datas[-1]["error"]["code"] == "stream_interrupted"
    assert text_of(datas[:-1]) == a.text


async def test_malformed_event_after_commit_is_dropped(gateway, upstreams):
    a = await upstreams("a")
    a.default = fu.sse(
        fu.chunk("Hi") + b"data: {broken\n\n" + fu.chunk(finish="stop") + b"data: [DONE]\n\n"
    )
    client = await gateway(a)
    resp, datas, done = await stream(client)  # read_stream would raise on invalid JSON
    assert done
    assert text_of(datas) == "Hi"


async def test_client_disconnect_cancels_upstream(gateway, upstreams):
    a = await upstreams("a")
    a.default = fu.stream(tokens=200, chunk_delay=0.05)
    client = await gateway(a)
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    await resp.content.readany()  # committed: the first token arrived
    resp.close()  # the client goes away
    await wait_until(lambda: a.disconnects == 1)


async def test_client_disconnect_while_waiting_for_first_token(gateway, upstreams):
    a = await upstreams("a")
    a.default = fu.stream(delay=30)
    client = await gateway(a, first_token_timeout=60)
    task = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(stream=True)))
    await wait_until(lambda: len(a.requests) == 1)
    task.cancel()
    await wait_until(lambda: a.disconnects == 1)


async def test_deadline_ends_a_committed_stream(gateway, upstreams):
    a = await upstreams("a")
    a.default = fu.stream(tokens=100, chunk_delay=0.05)  # never idle, but too long
    client = await gateway(a, idle_timeout=5)
    resp = await client.post(
        "/v1/chat/completions", json=chat(stream=True), headers={"x-gateway-timeout": "0.5"}
    )
    datas, done = await read_stream(resp)
    assert not done
    assert "request deadline reached" in datas[-1]["error"]["message"]
    assert 0 < len(text_of(datas[:-1]))
    await wait_until(lambda: a.disconnects == 1)
