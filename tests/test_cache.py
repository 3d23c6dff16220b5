"""The response cache: hits replayed byte for byte, what is never stored, keys, partitions,
bounds and the headers. Coalescing is in ``test_coalesce.py``, Redis in
``test_cache_redis.py``."""

from __future__ import annotations

import logging
from typing import Any

import openai
import orjson
import pytest
from prometheus_client import REGISTRY

from gateway.auth import AccessPolicy, digest
from gateway.cache import Cache, Entry, MemoryBackend, request_key, storable
from gateway.call import Call
from gateway.config import CacheSettings, ConfigError, load_settings
from gateway.convert import answer_to_stream, fold_stream, stream_to_answer
from gateway.routing import Route
from gateway.server import CACHED
from tests.conftest import chat
from tests.fake_upstream import (
    chunk,
    completion,
    content_refused,
    drop_after,
    server_error,
    sse,
)

USE = {"x-gateway-cache": "use"}


def det(stream: bool = False, **extra: Any) -> dict[str, Any]:
    """A deterministic chat request (temperature 0)."""
    return chat(stream=stream, temperature=0, **extra)


async def ask(
    client: Any,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    path: str = "/v1/chat/completions",
) -> tuple[int, Any, bytes]:
    resp = await client.post(path, json=body, headers=USE if headers is None else headers)
    data = await resp.read()
    return resp.status, resp.headers, data


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- hits and misses ------------------------------------------------------------------


async def test_non_stream_miss_then_hit_is_byte_identical(gateway, upstreams, caplog):
    up = await upstreams("openai")
    client = await gateway(up)
    served = metric("gateway_cache_bytes_total", op="served")
    status, first_headers, first = await ask(client, det())
    assert status == 200 and first_headers["x-gateway-cache"] == "miss"
    assert first_headers["x-gateway-provider"] == "openai"
    with caplog.at_level(logging.INFO, logger="gateway"):
        status, headers, again = await ask(client, det(), {**USE, "x-request-id": "hit-1"})
    assert status == 200 and again == first  # the stored id and created included
    assert headers["x-gateway-cache"] == "hit"
    assert headers["x-gateway-provider"] == "cache"
    assert headers["x-gateway-attempts"] == "0"
    assert headers["x-request-id"] == "hit-1"
    assert len(up.requests) == 1
    assert metric("gateway_cache_bytes_total", op="served") - served == len(first)
    line = next(r.getMessage() for r in caplog.records if "id=hit-1" in r.getMessage())
    assert "provider=cache" in line and "cache=hit source=openai" in line


async def test_stream_miss_then_hit_is_byte_identical(gateway, upstreams):
    up = await upstreams("openai")
    client = await gateway(up)
    status, headers, first = await ask(client, det(stream=True))
    assert status == 200 and headers["x-gateway-cache"] == "miss"
    assert first == up.sent[0]  # what the upstream sent, relayed unchanged
    status, headers, again = await ask(client, det(stream=True))
    assert status == 200 and headers["x-gateway-cache"] == "hit"
    assert headers["Content-Type"].startswith("text/event-stream")
    assert again == first
    assert len(up.requests) == 1


async def test_a_stream_from_a_stored_answer_parses_with_the_openai_sdk(gateway, upstreams):
    up = await upstreams("openai")
    client = await gateway(up)
    status, _, stored = await ask(client, det())  # stored as a complete answer
    assert status == 200
    base = str(client.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base, api_key="k", max_retries=0) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=det()["messages"],
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=USE,
        )
        assert raw.headers["x-gateway-cache"] == "hit"
        chunks = [c async for c in raw.parse()]
    answer = orjson.loads(stored)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == up.text
    assert {c.id for c in chunks} == {answer["id"]}
    assert {c.created for c in chunks} == {answer["created"]}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 15
    assert len(up.requests) == 1


async def test_an_answer_from_a_stored_stream(gateway, upstreams):
    up = await upstreams("openai")
    client = await gateway(up)
    await ask(client, det(stream=True))
    status, headers, body = await ask(client, det())
    assert status == 200 and headers["x-gateway-cache"] == "hit"
    assert headers["Content-Type"].startswith("application/json")
    answer = orjson.loads(body)
    assert answer["object"] == "chat.completion"
    assert answer["id"] == "chatcmpl-fake" and answer["created"] == 1700000000
    assert answer["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": up.text},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert len(up.requests) == 1


async def test_completions_and_embeddings_are_cached(gateway, upstreams):
    up = await upstreams("openai")
    rules = {"text-embedding-3-small": "deterministic"}
    client = await gateway(up, settings={"cache": CacheSettings(models=rules)})
    legacy = {"model": "gpt-4o-mini", "prompt": "Say hello", "temperature": 0}
    _, _, first = await ask(client, legacy, path="/v1/completions")
    _, headers, again = await ask(client, {**legacy, "stream": True}, path="/v1/completions")
    assert headers["x-gateway-cache"] == "hit"
    text = "".join(
        orjson.loads(line[6:])["choices"][0]["text"]
        for line in again.split(b"\n\n")
        if line.startswith(b"data: {")
    )
    assert text == orjson.loads(first)["choices"][0]["text"] == up.text
    # Embeddings are not sampled: a deterministic model rule caches them without a header.
    body = {"model": "text-embedding-3-small", "input": "hello"}
    _, _, vector = await ask(client, body, {}, path="/v1/embeddings")
    _, headers, again = await ask(client, body, {}, path="/v1/embeddings")
    assert headers["x-gateway-cache"] == "hit" and again == vector
    assert len(up.requests) == 2


# -- never cached ---------------------------------------------------------------------


async def test_errors_cut_streams_refusals_and_dropped_events_are_never_stored(gateway, upstreams):
    up = await upstreams("openai")
    client = await gateway(up, max_retries=0)
    cached = client.app[CACHED]
    backend = cached.cache.backend
    cases = [
        (server_error(500), det(), 503),  # no provider answered
        (content_refused(), det(), 400),  # the upstream's own refusal, passed on
        (drop_after(2), det(stream=True), 200),  # cut after the first token
        (sse(chunk("Hi") + b"data: {oops\n\n" + chunk(finish="stop") + b"data: [DONE]\n\n"),
         det(stream=True), 200),  # an event dropped after commit: complete, not stored
        (sse(chunk("Hi") + chunk(finish="content_filter") + b"data: [DONE]\n\n"),
         det(stream=True), 200),  # complete, but filtered
    ]  # fmt: skip
    for n, (behaviour, body, status) in enumerate(cases):
        up.then(behaviour)
        body["messages"][0]["content"] = f"case {n}"
        got, headers, _ = await ask(client, body)
        assert got == status and headers["x-gateway-cache"] == "miss"
        assert len(backend.keys()) == n, "stored"
        got, headers, _ = await ask(client, body)  # goes upstream again, and is stored
        assert got == 200 and headers["x-gateway-cache"] == "miss"
        assert len(backend.keys()) == n + 1
    assert len(up.requests) == 2 * len(cases)


async def test_sampled_answers_need_an_explicit_opt_in(gateway, upstreams):
    up = await upstreams("openai")
    rules = {"gpt-4o-mini": "deterministic", "creative": "always"}
    client = await gateway(up, settings={"cache": CacheSettings(models=rules)})
    # Under the operator's rule, temperature 1 (or unset) is a draw: never replayed.
    for body in (chat(temperature=1), chat(), chat(temperature=1)):
        status, headers, _ = await ask(client, body, headers={})
        assert status == 200 and headers["x-gateway-cache"] == "bypass"
    assert len(up.requests) == 3
    # temperature 0 under the same rule: cached without a header.
    assert (await ask(client, det(), headers={}))[1]["x-gateway-cache"] == "miss"
    assert (await ask(client, det(), headers={}))[1]["x-gateway-cache"] == "hit"
    # "always" (the operator's explicit opt-in) and the client's header cache draws too.
    assert (await ask(client, chat(model="creative"), headers={}))[1]["x-gateway-cache"] == "miss"
    assert (await ask(client, chat(model="creative"), headers={}))[1]["x-gateway-cache"] == "hit"
    sampled = chat(temperature=1, user="u2")
    assert (await ask(client, sampled))[1]["x-gateway-cache"] == "miss"
    assert (await ask(client, sampled))[1]["x-gateway-cache"] == "hit"
    # skip wins over a rule; no header and no rule: the cache is not mentioned at all.
    assert (await ask(client, det(), {"x-gateway-cache": "skip"}))[1]["x-gateway-cache"] == (
        "bypass"
    )
    assert "x-gateway-cache" not in (await ask(client, det(model="other"), headers={}))[1]
    assert len(up.requests) == 3 + 1 + 1 + 1 + 1 + 1


def test_what_is_storable():
    ok = completion("Hi", "m")
    assert storable("json", orjson.dumps(ok), "chat/completions")
    for change in (
        {"finish_reason": "content_filter"},
        {"finish_reason": None},
        {"message": {"role": "assistant", "content": None, "refusal": "I can't help."}},
    ):
        bad = {**ok, "choices": [{**ok["choices"][0], **change}]}
        assert not storable("json", orjson.dumps(bad), "chat/completions"), change
    assert not storable("json", b"not json", "chat/completions")
    # A stream's completeness is its relay's to judge (the never-stored test above); its
    # bytes say whether it was filtered or refused, not a text that mentions it.
    done = chunk(finish="stop") + b"data: [DONE]\n\n"
    assert storable("sse", chunk("Hi", role=True) + done, "chat/completions")
    assert storable("sse", chunk('say "refusal": "x" or content_filter') + done, "chat/completions")
    assert not storable("sse", chunk("Hi") + chunk(finish="content_filter"), "chat/completions")
    refused = b'data: {"choices":[{"index":0,"delta":{"refusal": "No."}}]}\n\n'
    assert not storable("sse", refused + done, "chat/completions")


async def test_refresh_replaces_and_ttl_header(gateway, upstreams):
    up = await upstreams("openai")
    client = await gateway(up)
    await ask(client, det())
    status, headers, _ = await ask(client, det(), {"x-gateway-cache": "refresh"})
    assert status == 200 and headers["x-gateway-cache"] == "miss"
    assert (await ask(client, det()))[1]["x-gateway-cache"] == "hit"
    assert len(up.requests) == 2
    for bad in ({"x-gateway-cache": "sometimes"}, {**USE, "x-gateway-cache-ttl": "0"},
                {**USE, "x-gateway-cache-ttl": "nan"}, {**USE, "x-gateway-cache-ttl": "1e9"},
                {**USE, "x-gateway-cache-ttl": "soon"}):  # fmt: skip
        status, headers, body = await ask(client, det(), bad)
        error = orjson.loads(body)["error"]
        assert status == 400 and error["code"] in ("invalid_cache_mode", "invalid_cache_ttl")
        assert headers["x-gateway-provider"] == "none"
    assert len(up.requests) == 2


# -- keys and partitions --------------------------------------------------------------


class _P:
    def __init__(self, name: str) -> None:
        self.name = name


def _call(**body: Any) -> Call:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    return Call("chat/completions", body, orjson.dumps(body), body["model"], False, "r", 0.0)


def test_the_key_is_the_canonical_request():
    routes: Any = [Route(_P("openai"), "gpt-4o"), Route(_P("lmstudio"), "local")]
    base = request_key(_call(temperature=0), routes, "")
    # Framing, key order and the request id do not matter ...
    same = _call(temperature=0, stream=True, stream_options={"include_usage": True})
    same.request_id = "other"
    assert request_key(same, routes, "") == base
    reordered = Call(
        "chat/completions", {"temperature": 0, **_call().body}, b"", "m", False, "r", 0
    )
    assert request_key(reordered, routes, "") == base
    # ... what changes the answer does: parameters, the routes, the endpoint, the tenant.
    assert request_key(_call(temperature=0.5), routes, "") != base
    assert request_key(_call(temperature=0, max_tokens=5), routes, "") != base
    assert request_key(_call(temperature=0), routes[:1], "") != base
    assert request_key(_call(temperature=0), routes, digest("k")) != base
    assert len(base) == 64 and all(c in "0123456789abcdef" for c in base)


async def test_aliases_share_their_target_entries(gateway, upstreams):
    up = await upstreams("openai")
    client = await gateway(up, aliases={"fast": "gpt-4o-mini"})
    await ask(client, det(model="fast"))
    assert (await ask(client, det()))[1]["x-gateway-cache"] == "hit"


async def test_partitioned_per_client_key_unless_shared(gateway, upstreams):
    keys = ("sk-client-one-0123456789", "sk-client-two-0123456789")
    access = AccessPolicy(client_keys=frozenset(digest(k) for k in keys))
    up = await upstreams("openai")
    for shared in (False, True):
        settings = {"access": access, "cache": CacheSettings(shared=shared)}
        client = await gateway(up, settings=settings)
        one, two = ({**USE, "Authorization": f"Bearer {k}"} for k in keys)
        assert (await ask(client, det(), one))[1]["x-gateway-cache"] == "miss"
        assert (await ask(client, det(), one))[1]["x-gateway-cache"] == "hit"
        expect = "hit" if shared else "miss"  # a hit would tell one tenant what another asked
        assert (await ask(client, det(), two))[1]["x-gateway-cache"] == expect
        stored = client.app[CACHED].cache.backend.keys()
        for key in stored:
            for secret in keys:
                assert secret not in key and digest(secret) not in key
        assert len(stored) == (1 if shared else 2)


# -- bounds ---------------------------------------------------------------------------


async def test_memory_stays_within_its_byte_bound_under_unique_requests(gateway, upstreams):
    up = await upstreams("openai")
    cache = CacheSettings(max_bytes=4096, max_entry_bytes=2048)
    client = await gateway(up, settings={"cache": cache})
    backend = client.app[CACHED].cache.backend
    evicted = metric("gateway_cache_evictions_total", reason="size")
    for n in range(60):
        status, headers, _ = await ask(client, det(user=f"user-{n}"))
        assert status == 200 and headers["x-gateway-cache"] == "miss"
        assert 0 < backend.bytes <= 4096
        assert metric("gateway_cache_size_bytes") == backend.bytes
    assert len(backend.keys()) < 60
    assert metric("gateway_cache_evictions_total", reason="size") - evicted == 60 - len(
        backend.keys()
    )
    # The most recent entries are the ones kept.
    assert (await ask(client, det(user="user-59")))[1]["x-gateway-cache"] == "hit"


async def test_memory_backend_lru_entries_and_ttl():
    now = [0.0]
    backend = MemoryBackend(max_entries=2, max_bytes=1 << 20, clock=lambda: now[0])

    def entry(n: int) -> Entry:
        return Entry("json", b"x" * n, "openai", 0.0)

    await backend.set("a", entry(1), 10)
    await backend.set("b", entry(2), 10)
    assert await backend.get("a") is not None  # a is now the most recently used
    await backend.set("c", entry(3), 10)  # evicts b
    assert backend.keys() == ["a", "c"]
    now[0] = 9.9
    assert await backend.get("c") is not None
    now[0] = 10.0
    assert await backend.get("c") is None and backend.keys() == ["a"]
    assert backend.bytes == len("a") + 1 + 160
    assert not await backend.set("big", Entry("json", b"x" * (1 << 20), "o", 0), 10)


async def test_an_answer_larger_than_max_entry_bytes_is_served_not_stored(gateway, upstreams):
    up = await upstreams("openai")
    up.text = "x" * 3000
    client = await gateway(up, settings={"cache": CacheSettings(max_entry_bytes=2048)})
    for _ in range(2):
        status, headers, body = await ask(client, det())
        assert status == 200 and headers["x-gateway-cache"] == "miss"
        assert orjson.loads(body)["choices"][0]["message"]["content"] == up.text


# -- visibility and configuration -----------------------------------------------------


async def test_metrics_and_readyz(gateway, upstreams):
    up = await upstreams("openai")
    client = await gateway(up)
    before = {
        r: metric("gateway_cache_requests_total", result=r) for r in ("hit", "miss", "bypass")
    }
    await ask(client, det())
    await ask(client, det())
    await ask(client, det(), {"x-gateway-cache": "skip"})
    for result in ("hit", "miss", "bypass"):
        assert metric("gateway_cache_requests_total", result=result) - before[result] == 1
    assert metric("gateway_requests_total", model="other", provider="cache", status="200",
                  stream="false") >= 1  # fmt: skip
    ready = await (await client.get("/readyz")).json()
    assert ready["cache"] == {"backend": "memory", "status": "ok", "entries": 1}


async def test_cache_disabled_ignores_the_headers(gateway, upstreams):
    up = await upstreams("openai")
    client = await gateway(up, settings={"cache": CacheSettings(enabled=False)})
    for _ in range(2):
        status, headers, _ = await ask(client, det())
        assert status == 200 and "x-gateway-cache" not in headers
    assert CACHED not in client.app
    assert "cache" not in await (await client.get("/readyz")).json()
    assert len(up.requests) == 2


def test_cache_settings_from_toml_and_env(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text(
        "[cache]\nttl = 60\nshared = true\nmax_bytes = 1048576\nmax_entry_bytes = 4096\n"
        '[cache.models]\nfast = "deterministic"\n'
    )
    env = {"GATEWAY_CONFIG": str(path), "REDIS_URL": "redis://:s3cret-pass@127.0.0.1:6390/0"}
    cache = load_settings(env).cache
    assert (cache.ttl, cache.shared, cache.max_bytes, cache.models) == (
        60.0, True, 1048576, {"fast": "deterministic"}
    )  # fmt: skip
    assert cache.redis_url == env["REDIS_URL"] and "s3cret" not in repr(cache)
    for toml, key in (
        ("[cache]\nttl = 0\n", "cache.ttl"),
        ("[cache]\nmax_ttl = 10\n", "cache.max_ttl"),
        ("[cache]\nmax_bytes = 2048\n", "cache.max_bytes"),
        ("[cache]\nsize = 1\n", "cache.size"),
        ('[cache.models]\nfast = "sometimes"\n', "cache.models.fast"),
        ('[cache]\nredis_url = "http://user:pw@host"\n', "cache.redis_url"),
    ):
        path.write_text(toml)
        with pytest.raises(ConfigError) as e:
            load_settings({"GATEWAY_CONFIG": str(path)})
        assert e.value.key == key and "pw" not in str(e.value)


# -- conversions ----------------------------------------------------------------------


def test_tool_calls_and_legacy_text_convert_both_ways():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    answer = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "m",
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }  # fmt: skip
    stream = answer_to_stream(orjson.dumps(answer), "chat/completions", include_usage=True)
    assert stream.endswith(b"data: [DONE]\n\n")
    assert fold_stream(stream, "chat/completions") == answer
    # A stream that sends the arguments in pieces, as OpenAI does.
    pieces = [
        {
            "index": 0,
            "id": "call_1",
            "type": "function",
            "function": {"name": "f", "arguments": ""},
        },
        {"index": 0, "function": {"arguments": '{"a"'}},
        {"index": 0, "function": {"arguments": ":1}"}},
    ]
    events = b"".join(
        b"data: " + orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                                  "created": 5, "model": "m", "choices": [
                                      {"index": 0, "delta": {"tool_calls": [p]},
                                       "logprobs": None, "finish_reason": None}]}) + b"\n\n"
        for p in pieces
    ) + chunk(finish="tool_calls") + b"data: [DONE]\n\n"  # fmt: skip
    folded = fold_stream(events, "chat/completions")
    assert folded["choices"][0]["message"]["tool_calls"] == [call]
    assert folded["choices"][0]["finish_reason"] == "tool_calls"
    legacy = completion("Hello there", "m", legacy=True)
    sse_body = answer_to_stream(orjson.dumps(legacy), "completions", include_usage=True)
    assert orjson.loads(stream_to_answer(sse_body, "completions")) == legacy


def test_cache_plan_reads_the_ttl_header():
    cache = Cache(CacheSettings(ttl=30), MemoryBackend(10, 1 << 20), partitioned=False)
    routes: Any = [Route(_P("openai"), "m")]
    plan = cache.plan({"x-gateway-cache": "use", "x-gateway-cache-ttl": "2.5"}, _call(), routes, "")
    assert plan is not None and plan.ttl == 2.5 and plan.lookup
    plan = cache.plan({"x-gateway-cache": "refresh"}, _call(), routes, "")
    assert plan is not None and plan.ttl == 30 and not plan.lookup
