"""Rescue: a stream cut after its first token is restarted, checked and spliced.

The primary (OpenAI's place) sends part of an answer and fails; the fallback (LM Studio's
place) answers the restarted request. What the client gets is one well-formed stream when
the fallback reproduces what it already had, and the usual partial answer with one error
event when it does not.
"""

from __future__ import annotations

import asyncio
import logging

import openai
import orjson
import pytest
from prometheus_client import REGISTRY

from gateway.config import ConfigError, RescueSettings, load_settings
from gateway.server import PROVIDERS
from gateway.sse import SSEParser
from tests import fake_upstream as fu
from tests.conftest import chat
from tests.fake_upstream import WORDS, wait_until
from tests.test_streaming import text_of

RESCUE = {"x-gateway-rescue": "on"}
# The primary's and the fallback's chunks differ in id, model and created: the client must
# only ever see the primary's.
IDENT_A = {"id": "chatcmpl-primary", "model": "model-a", "created": 1700000001}
IDENT_B = {"id": "chatcmpl-fallback", "model": "model-b", "created": 1700000002}


def rescues(result: str) -> float:
    return REGISTRY.get_sample_value("gateway_stream_rescues_total", {"result": result}) or 0.0


def words(n: int) -> str:
    return "".join(WORDS[i % len(WORDS)] for i in range(n))


async def pair(upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.ident, b.ident = IDENT_A, IDENT_B
    return a, b


async def post(client, headers=RESCUE, **body):
    resp = await client.post(
        "/v1/chat/completions", json=chat(stream=True, **body), headers=headers
    )
    assert resp.status == 200
    raw = await resp.read()
    datas, done = [], False
    for event in SSEParser().feed(raw):
        if event.data == b"[DONE]":
            assert not done, "two [DONE]"
            done = True
        elif event.data is not None:
            datas.append(orjson.loads(event.data))
    return resp, raw, datas, done


async def test_cut_after_40_of_60_tokens_is_rescued_exactly_once(gateway, upstreams, caplog):
    caplog.set_level(logging.INFO, logger="gateway")
    a, b = await pair(upstreams)
    a.default = fu.drop_after(40)
    b.default = fu.stream(tokens=60)
    client = await gateway(a, b, fail_max=5)
    before = rescues("rescued")
    resp, raw, datas, done = await post(client, stream_options={"include_usage": True})
    assert done
    assert resp.headers["x-gateway-provider"] == "openai"  # sent at commit
    contents = [
        c["delta"]["content"] for d in datas for c in d["choices"] if c["delta"].get("content")
    ]
    assert len(contents) == 60 and "".join(contents) == words(60)
    assert all({k: d[k] for k in IDENT_A} == IDENT_A for d in datas)
    assert [d["choices"][0]["finish_reason"] for d in datas if d["choices"]].count("stop") == 1
    usage = [d["usage"] for d in datas if d.get("usage")]
    assert usage == [fu.completion("", "")["usage"]]  # the fallback's own, once
    assert b": the gateway is rescuing this stream" in raw  # kept alive meanwhile
    assert (
        sum(d["choices"][0]["delta"].get("role") == "assistant" for d in datas if d["choices"]) == 1
    )
    assert rescues("rescued") - before == 1
    assert len(b.requests) == 1 and "messages" in b.requests[0]
    assert b.requests[0]["messages"] == a.requests[0]["messages"]  # restarted, no prefill
    providers = client.app[PROVIDERS]
    assert providers["openai"].breaker.fail_counter == 1  # the cut is the primary's failure
    assert providers["lmstudio"].breaker.fail_counter == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("request id="))
    assert " rescues=1 rescued_by=lmstudio" in line and "outcome=ok" in line


async def test_official_sdk_reassembles_a_rescued_stream(gateway, upstreams):
    a, b = await pair(upstreams)
    a.default = fu.drop_after(40)
    b.default = fu.stream(tokens=60)
    client = await gateway(a, b)
    base = str(client.make_url("/v1"))
    async with openai.AsyncOpenAI(
        base_url=base, api_key="k", max_retries=0, default_headers=RESCUE
    ) as sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == words(60)
    assert {c.id for c in chunks} == {IDENT_A["id"]}
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_an_error_event_after_commit_is_rescued(gateway, upstreams):
    a, b = await pair(upstreams)
    overloaded = {"error": {"message": "The server is overloaded", "type": "server_error"}}
    events = fu.chunk("Hello", ident=IDENT_A) + fu.chunk(" from", ident=IDENT_A)
    a.default = fu.sse(events + b"data: " + orjson.dumps(overloaded) + b"\n\n")
    client = await gateway(a, b)
    _, raw, datas, done = await post(client)
    assert done and text_of(datas) == b.text
    assert b"overloaded" not in raw


async def test_a_fallback_that_answers_otherwise_leaves_the_usual_error(gateway, upstreams):
    a, b = await pair(upstreams)
    a.default = fu.drop_after(40)
    words_b = ("Goodbye", " from", " elsewhere", ".")
    b.default = fu.stream(tokens=60, words=words_b, chunk_delay=0.05)
    client = await gateway(a, b)
    before = rescues("diverged")
    _, raw, datas, done = await post(client)
    assert not done
    assert text_of(datas[:-1]) == words(40)
    assert datas[-1]["error"]["code"] == "stream_interrupted"
    assert "OpenAI stream failed after the first token" in datas[-1]["error"]["message"]
    assert b"Goodbye" not in raw and b"elsewhere" not in raw
    assert rescues("diverged") - before == 1
    await wait_until(lambda: b.disconnects == 1)  # its request ends at the first difference


async def test_a_stall_after_20_tokens_is_rescued_after_idle_timeout(gateway, upstreams):
    a, b = await pair(upstreams)
    a.default = fu.stall_after(20)
    # Another server, another chunking: the text sent ends inside one of its chunks.
    b.default = fu.stream(tokens=12, words=("Hello from the", " fake upstream."))
    client = await gateway(a, b, per={"openai": {"idle_timeout": 0.3}})
    before = rescues("rescued")
    _, _, datas, done = await post(client)
    assert done
    assert text_of(datas) == words(36)
    assert all(d["id"] == IDENT_A["id"] for d in datas)
    assert rescues("rescued") - before == 1


@pytest.mark.parametrize(
    ("prefill", "result", "sent"),
    [("reject", "rescued", 2), ("continue", "continued", 1)],
    ids=["refused: a verified restart", "accepted: continued"],
)
async def test_prefill(gateway, upstreams, prefill, result, sent):
    a, b = await pair(upstreams)
    a.default = fu.drop_after(10)
    b.default = fu.stream(tokens=30)
    b.prefill = prefill  # the fallback refuses an assistant prefill, or continues it
    rules = RescueSettings(models={"careful": "prefill"})
    client = await gateway(a, b, settings={"rescue": rules})
    before = rescues(result)
    _, raw, datas, done = await post(client, headers={}, model="careful")
    assert done and text_of(datas) == words(30)
    assert all(d["id"] == IDENT_A["id"] for d in datas)
    assert b"Expected last role" not in raw and b"400" not in raw
    assert len(b.requests) == sent
    assert [m["role"] for m in b.requests[0]["messages"]] == ["user", "assistant"]
    assert b.requests[0]["messages"][-1]["content"] == words(10)
    if sent == 2:  # then restarted as it was, and verified
        assert b.requests[1]["messages"] == a.requests[0]["messages"]
    assert rescues(result) - before == 1


def tool_arguments(datas):
    calls = [
        t for d in datas for c in d.get("choices", []) for t in c["delta"].get("tool_calls") or []
    ]
    return calls, "".join(t["function"].get("arguments", "") for t in calls)


@pytest.mark.parametrize(
    ("args", "rescued"),
    [(fu.TOOL_ARGS, True), (('{"town": ', '"Paris"}'), False)],
    ids=["same arguments", "other arguments"],
)
async def test_tool_call_streams_are_rescued_only_when_arguments_match(
    gateway, upstreams, args, rescued
):
    a, b = await pair(upstreams)
    a.default = fu.tool(cut_after=2)  # the call's id and name, then '{"city": '
    b.default = fu.tool(args=args)
    client = await gateway(a, b)
    _, raw, datas, done = await post(client, tools=[{"type": "function"}])
    calls, arguments = tool_arguments(datas)
    assert done is rescued
    if rescued:
        assert arguments == "".join(fu.TOOL_ARGS)
        assert [t.get("id") for t in calls if t.get("id")] == ["call_1"]
        assert [t["function"].get("name") for t in calls if t["function"].get("name")] == [
            fu.TOOL_NAME
        ]
        assert datas[-1]["choices"][0]["finish_reason"] == "tool_calls"
    else:
        assert arguments == fu.TOOL_ARGS[0]
        assert datas[-1]["error"]["code"] == "stream_interrupted"
        assert b"town" not in raw


async def test_a_second_restart_when_the_first_fails_before_the_text_sent(gateway, upstreams):
    a, b = await pair(upstreams)
    c = await upstreams("c")
    c.ident = {"id": "chatcmpl-third"}
    a.default = fu.drop_after(20)
    b.default = fu.drop_after(10)  # cut again before it reproduced the 20 tokens sent
    c.default = fu.stream(tokens=30)
    client = await gateway(a, b, c, settings={"rescue": RescueSettings(max_rescues=2)})
    failed, rescued = rescues("failed"), rescues("rescued")
    _, _, datas, done = await post(client)
    assert done and text_of(datas) == words(30)
    assert {d["id"] for d in datas} == {IDENT_A["id"]}
    assert (rescues("failed") - failed, rescues("rescued") - rescued) == (1, 1)


async def test_one_restart_by_default(gateway, upstreams):
    a, b = await pair(upstreams)
    c = await upstreams("c")
    a.default = fu.drop_after(20)
    b.default = fu.drop_after(10)
    client = await gateway(a, b, c)
    _, _, datas, done = await post(client)
    assert not done and text_of(datas[:-1]) == words(20)
    assert "OpenAI stream failed" in datas[-1]["error"]["message"]  # the original failure
    assert not c.requests


async def test_a_text_longer_than_max_prefix_bytes_is_not_rescued(gateway, upstreams):
    a, b = await pair(upstreams)
    a.default = fu.drop_after(300)  # about 1.4 KB of text
    client = await gateway(a, b, settings={"rescue": RescueSettings(max_prefix_bytes=1024)})
    before = rescues("skipped")
    _, _, datas, done = await post(client)
    assert not done and text_of(datas[:-1]) == words(300)
    assert datas[-1]["error"]["code"] == "stream_interrupted"
    assert not b.requests
    assert rescues("skipped") - before == 1


async def test_without_rescue_a_cut_ends_with_the_error_event(gateway, upstreams):
    a, b = await pair(upstreams)
    a.default = fu.drop_after(5)
    client = await gateway(
        a, b, settings={"rescue": RescueSettings(models={"gpt-4o-mini": "restart"})}
    )
    _, _, datas, done = await post(client, headers={"x-gateway-rescue": "off"})
    assert not done and datas[-1]["error"]["code"] == "stream_interrupted"
    assert not b.requests


async def test_a_bad_rescue_header_is_a_400(gateway, upstreams):
    a = await upstreams("a")
    client = await gateway(a)
    resp = await client.post(
        "/v1/chat/completions", json=chat(), headers={"x-gateway-rescue": "yes"}
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_rescue_mode"
    assert not a.requests


@pytest.mark.parametrize(
    "restart",
    [
        lambda: fu.stream(tokens=10, gate=asyncio.Event()),  # no first token yet
        lambda: fu.stream(tokens=10, midway=asyncio.Event()),  # one token, then silence
    ],
    ids=["before its first token", "while it reproduces the text"],
)
async def test_client_leaving_during_a_rescue_cancels_the_restart(gateway, upstreams, restart):
    a, b = await pair(upstreams)
    a.default = fu.drop_after(5)
    b.default = restart()
    client = await gateway(a, b)
    resp = await client.post("/v1/chat/completions", json=chat(stream=True), headers=RESCUE)
    await wait_until(lambda: len(b.requests) == 1)
    resp.close()
    await wait_until(lambda: b.disconnects == 1)
    await wait_until(lambda: all(p.inflight == 0 for p in client.app[PROVIDERS].values()))


def test_rescue_settings_from_toml(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text(
        "[rescue]\nmax_rescues = 2\nmax_prefix_bytes = 65536\nkeepalive = 2\n"
        '[rescue.models]\nfast = "restart"\ncareful = "prefill"\nloose = "off"\n'
    )
    rescue = load_settings({"GATEWAY_CONFIG": str(path)}).rescue
    assert (rescue.max_rescues, rescue.max_prefix_bytes, rescue.keepalive) == (2, 65536, 2.0)
    assert rescue.models == {"fast": "restart", "careful": "prefill", "loose": "off"}


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[rescue]\nmax_rescues = 0\n", "rescue.max_rescues"),
        ("[rescue]\nmax_prefix_bytes = 10\n", "rescue.max_prefix_bytes"),
        ("[rescue]\nkeepalive = 0\n", "rescue.keepalive"),
        ("[rescue]\nretries = 1\n", "rescue.retries"),
        ('[rescue.models]\nfast = "always"\n', "rescue.models.fast"),
    ],
)
def test_rescue_settings_are_checked(tmp_path, toml, key):
    path = tmp_path / "gw.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings({"GATEWAY_CONFIG": str(path)})
    assert info.value.key == key
