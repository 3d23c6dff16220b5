"""Every shape a real upstream streams in, judged by one stream state from first to last byte.

Complete answers reach the client byte for byte with ``[DONE]``, no error event and no
breaker failure, whatever their shape; a stream with a choice left unfinished is a cut;
finished streams leave their connection in the pool.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest
from prometheus_client import REGISTRY

from gateway.server import PROVIDERS
from gateway.sse import SSEParser
from gateway.stream import StreamState, has_output
from tests import fake_upstream as fu
from tests.conftest import chat
from tests.test_streaming import read_stream

DONE = b"data: [DONE]\n\n"

# name -> (behaviour, endpoint); every one is a complete answer.
COMPLETE = {
    "finish on the first (only) content chunk": (fu.one_chunk(), "chat/completions"),
    "finish on the last content chunk": (fu.stream(finish_on_last=True), "chat/completions"),
    "empty answer (role, then finish only)": (fu.empty(), "chat/completions"),
    "empty answer without a role chunk": (fu.empty(role_chunk=False), "chat/completions"),
    "one chunk, no [DONE]": (fu.one_chunk(done=False), "chat/completions"),
    "legacy completions, one chunk": (fu.one_chunk(), "completions"),
    "legacy completions": (fu.stream(), "completions"),
    "n = 2": (fu.stream(n=2), "chat/completions"),
    "n = 2, finish on the last chunk": (fu.stream(n=2, finish_on_last=True), "chat/completions"),
    '"error": null in every chunk': (fu.stream(error_null=True), "chat/completions"),
    "Text/Event-Stream": (
        fu.stream(content_type="Text/Event-Stream; charset=UTF-8"),
        "chat/completions",
    ),
    "body ends in a later read than [DONE]": (fu.stream(end_delay=0.1), "chat/completions"),
    **{
        f"output in delta.{field}": (fu.stream(field=field, tokens=2), "chat/completions")
        for field in fu.OUTPUT_FIELDS
    },
    **{
        f"one chunk in delta.{field}": (fu.one_chunk(field=field), "chat/completions")
        for field in fu.OUTPUT_FIELDS
    },
}


def sample(name, labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("name", list(COMPLETE))
async def test_complete_shapes_reach_the_client_whole(name, gateway, upstreams):
    behaviour, endpoint = COMPLETE[name]
    a, b = await upstreams("a"), await upstreams("b")
    a.default = behaviour
    client = await gateway(a, b, fail_max=1)
    cuts = sample(
        "gateway_stream_interruptions_total", {"provider": "openai", "reason": "bad_response"}
    )
    body = chat(stream=True)
    if endpoint == "completions":
        body = {"model": "gpt-4o-mini", "prompt": "Say hello", "stream": True}
    resp = await client.post(f"/v1/{endpoint}", json=body)
    received = await resp.read()
    assert resp.status == 200
    assert resp.headers["x-gateway-provider"] == "openai"
    assert resp.headers["x-gateway-attempts"] == "1"
    sent = a.sent[-1]
    # byte for byte what the upstream sent, keep-alive-free, with [DONE] added if missing
    assert received == (sent if sent.endswith(DONE) else sent + DONE)
    assert b'"error":{' not in received
    breaker = client.app[PROVIDERS]["openai"].breaker
    assert breaker.fail_counter == 0 and breaker.state.value == "closed"
    after = sample(
        "gateway_stream_interruptions_total", {"provider": "openai", "reason": "bad_response"}
    )
    assert after == cuts
    assert b.requests == []


@pytest.mark.parametrize("done", [True, False], ids=["with [DONE]", "without [DONE]"])
async def test_n2_with_one_choice_cut_is_an_interruption(done, gateway, upstreams):
    a = await upstreams("a")
    a.default = fu.stream(n=2, cut_choice=1, done=done)
    client = await gateway(a, fail_max=5)
    resp = await client.post("/v1/chat/completions", json=chat(stream=True, n=2))
    datas, saw_done = await read_stream(resp)
    assert resp.status == 200
    assert not saw_done
    assert datas[-1]["error"]["code"] == "stream_interrupted"
    assert sum("error" in d for d in datas) == 1
    # both choices' text got through before the error
    texts = {
        c["index"]: c["delta"].get("content") or ""
        for d in datas[:-1]
        for c in d.get("choices", [])
    }
    assert set(texts) == {0, 1}
    assert client.app[PROVIDERS]["openai"].breaker.fail_counter == 1


async def test_thinking_model_commits_at_its_first_reasoning_token(gateway, upstreams):
    """Ollama streams thinking in delta.reasoning for longer than first_token_timeout."""
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.stream(field="reasoning", tokens=6, chunk_delay=0.2)
    client = await gateway(a, b, first_token_timeout=0.5)
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    received = await resp.read()
    assert resp.headers["x-gateway-provider"] == "openai"
    assert received == a.sent[-1]
    assert client.app[PROVIDERS]["openai"].breaker.fail_counter == 0
    assert b.requests == []


async def test_error_null_in_a_plain_answer_is_not_an_error(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.ok(error_null=True)
    client = await gateway(a, b)
    resp = await client.post("/v1/chat/completions", json=chat())
    body = orjson.loads(await resp.read())
    assert resp.headers["x-gateway-provider"] == "openai"
    assert body["choices"][0]["message"]["content"] == a.text
    assert body["error"] is None


@pytest.mark.parametrize(
    "behaviour",
    [fu.stream(), fu.stream(end_delay=0.05), fu.one_chunk(), fu.empty(), fu.ok()],
    ids=["stream", "terminator later", "one chunk", "empty", "non-stream"],
)
async def test_finished_answers_leave_their_connection_in_the_pool(behaviour, gateway, upstreams):
    a = await upstreams("a")
    a.default = behaviour
    client = await gateway(a)
    for _ in range(20):
        resp = await client.post("/v1/chat/completions", json=chat(stream=behaviour.kind == "ok"))
        assert resp.status == 200
        await resp.read()
    await asyncio.sleep(0)
    assert len(a.requests) == 20
    assert a.connections == 1


# -- the stream state on its own -----------------------------------------------------------


def events(*raw: bytes):
    return SSEParser().feed(b"".join(raw))


def test_state_sees_the_first_event_that_is_also_the_last():
    state = StreamState("p", "r")
    out: list[bytes] = []
    raw = (fu.chunk("Hi", "stop"), DONE)
    state.take(events(*raw), out)
    assert state.output and state.complete and state.done and state.failure is None
    assert b"".join(out) == b"".join(raw)


def test_state_done_before_every_choice_finished_is_a_cut():
    state = StreamState("p", "r")
    out: list[bytes] = []
    state.take(events(fu.chunk("a", indexes=(0, 1)), fu.chunk(finish="stop"), DONE), out)
    assert state.output and not state.done
    assert state.failure is not None and "finish_reason" in state.failure.detail


def test_state_end_without_done_adds_it_when_complete():
    state = StreamState("p", "r")
    out: list[bytes] = []
    state.take(events(fu.chunk("a", "stop")), out)
    state.end(out)
    assert state.done and out[-1] == DONE


def test_state_usage_after_finish_is_kept():
    state = StreamState("p", "r")
    usage_chunk = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
    state.take(events(fu.chunk("a", "stop"), usage_chunk, DONE), [])
    assert state.done and state.usage == {"prompt_tokens": 3, "completion_tokens": 1}


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"delta": {"role": "assistant", "content": ""}}, False),
        ({"delta": {"role": "assistant", "content": None, "refusal": None}}, False),
        ({"delta": {}}, False),
        ({"delta": {"content": "Hi"}}, True),
        ({"delta": {"tool_calls": [{"index": 0}]}}, True),
        ({"delta": {"tool_calls": []}}, False),
        ({"delta": {"function_call": {"arguments": "{"}}}, True),
        ({"delta": {"refusal": "No"}}, True),
        ({"delta": {"reasoning_content": "hmm"}}, True),
        ({"delta": {"reasoning": "hmm"}}, True),
        ({"delta": {"audio": {"transcript": "Hi"}}}, True),
        ({"delta": {"brand_new": [1]}}, True),
        ({"delta": {}, "finish_reason": "stop"}, True),
        ({"text": "Hi", "index": 0}, True),
        ({"text": "", "index": 0}, False),
    ],
)
def test_has_output(choice, expected):
    assert has_output(choice) is expected


def test_usage_only_and_role_chunks_are_not_output():
    state = StreamState("p", "r")
    out: list[bytes] = []
    state.take(
        events(fu.chunk(role=True), b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n'), out
    )
    assert not state.output and len(out) == 2
