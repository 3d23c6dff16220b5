"""Request coalescing: identical cacheable requests in flight share one upstream call, and
no client's departure or failure costs another client its answer."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway.config import Settings
from gateway.server import CACHED, create_app, drain
from tests.conftest import chat, provider_configs
from tests.fake_upstream import ok, server_error, stream, wait_until

USE = {"x-gateway-cache": "use"}
BODY = chat(temperature=0)


def readers(app: Any) -> int:
    """Clients reading flights now."""
    return sum(len(f.readers) for f in app[CACHED].flights.values())


async def fetch(client: Any, body: dict[str, Any]) -> tuple[int, Any, bytes]:
    resp = await client.post("/v1/chat/completions", json=body, headers=USE)
    return resp.status, resp.headers, await resp.read()


async def test_fifty_identical_requests_make_one_upstream_call(gateway, upstreams):
    up = await upstreams("openai")
    gate = asyncio.Event()
    up.then(ok(gate=gate))
    client = await gateway(up)
    tasks = [asyncio.create_task(fetch(client, BODY)) for _ in range(40)]
    tasks += [asyncio.create_task(fetch(client, {**BODY, "stream": True})) for _ in range(10)]
    await wait_until(lambda: readers(client.app) == 50 and len(up.requests) == 1)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert [status for status, _, _ in results] == [200] * 50
    kinds = sorted(headers["x-gateway-cache"] for _, headers, _ in results)
    assert kinds == ["coalesced"] * 49 + ["miss"]
    answers = {body for _, headers, body in results[:40]}
    assert len(answers) == 1  # the same bytes for every non-stream client
    (answer,) = answers
    text = orjson.loads(answer)["choices"][0]["message"]["content"]
    for _, headers, body in results[40:]:  # streams: the answer converted
        assert headers["Content-Type"].startswith("text/event-stream")
        assert body.endswith(b"data: [DONE]\n\n")
        deltas = [orjson.loads(e[6:]) for e in body.split(b"\n\n") if e.startswith(b"data: {")]
        assert "".join(d["choices"][0]["delta"].get("content", "") for d in deltas) == text
    assert len(up.requests) == 1
    assert client.app[CACHED].flights == {}
    # Stored: the next one is a hit.
    assert (await fetch(client, BODY))[1]["x-gateway-cache"] == "hit"


async def test_the_first_client_leaving_mid_stream_still_completes_the_others(gateway, upstreams):
    up = await upstreams("openai")
    midway = asyncio.Event()
    up.then(stream(midway=midway))
    client = await gateway(up)
    body = {**BODY, "stream": True}
    first = await client.post("/v1/chat/completions", json=body, headers=USE)
    assert first.headers["x-gateway-cache"] == "miss"
    assert b'"content":"Hello"' in await first.content.readany()  # committed, mid-way
    streams = [asyncio.create_task(fetch(client, body)) for _ in range(3)]
    answer = asyncio.create_task(fetch(client, BODY))
    leaving = await client.post("/v1/chat/completions", json=body, headers=USE)
    await leaving.content.readany()  # a follower that got the start, then leaves too
    await wait_until(lambda: readers(client.app) == 6)
    first.close()
    leaving.close()
    await wait_until(lambda: readers(client.app) == 4)
    midway.set()
    results = await asyncio.gather(*streams, answer)
    for status, headers, data in results[:3]:
        assert status == 200 and headers["x-gateway-cache"] == "coalesced"
        assert data == up.sent[0]  # every byte the upstream sent, from the first
    status, headers, data = results[3]
    assert status == 200 and headers["x-gateway-cache"] == "coalesced"
    assert orjson.loads(data)["choices"][0]["message"]["content"] == up.text
    assert len(up.requests) == 1 and up.disconnects == 0  # the upstream call went on
    await wait_until(lambda: client.app[CACHED].flights == {})
    hit = await fetch(client, body)
    assert hit[1]["x-gateway-cache"] == "hit" and hit[2] == up.sent[0]


async def test_the_first_client_leaving_before_the_answer_leaves_the_call_to_the_others(
    gateway, upstreams
):
    up = await upstreams("openai")
    gate = asyncio.Event()
    up.then(ok(gate=gate))
    client = await gateway(up)
    first = asyncio.create_task(fetch(client, BODY))
    await wait_until(lambda: readers(client.app) == 1 and len(up.requests) == 1)
    follower = asyncio.create_task(fetch(client, BODY))
    await wait_until(lambda: readers(client.app) == 2)
    first.cancel()  # its client hangs up while the upstream has not answered
    await wait_until(lambda: readers(client.app) == 1)
    gate.set()
    status, headers, body = await follower
    assert status == 200 and headers["x-gateway-cache"] == "coalesced"
    assert orjson.loads(body)["choices"][0]["message"]["content"] == up.text
    assert len(up.requests) == 1 and up.disconnects == 0


async def test_a_failed_first_call_is_handed_to_a_follower(gateway, upstreams):
    up = await upstreams("openai")
    gate = asyncio.Event()
    failure = server_error(500)
    failure.gate = gate
    up.then(failure)
    client = await gateway(up, max_retries=0)
    leader = asyncio.create_task(fetch(client, BODY))
    await wait_until(lambda: readers(client.app) == 1 and len(up.requests) == 1)
    follower = asyncio.create_task(fetch(client, BODY))
    await wait_until(lambda: readers(client.app) == 2)
    gate.set()
    (status, headers, body), (f_status, f_headers, f_body) = await asyncio.gather(leader, follower)
    assert status == 503 and orjson.loads(body)["error"]["code"] == "all_providers_failed"
    assert headers["x-gateway-cache"] == "miss"
    assert f_status == 200 and f_headers["x-gateway-cache"] == "miss"  # its own call
    assert orjson.loads(f_body)["choices"][0]["message"]["content"] == up.text
    assert len(up.requests) == 2


async def test_the_last_client_leaving_cancels_the_upstream_call(gateway, upstreams):
    up = await upstreams("openai")
    midway = asyncio.Event()
    up.then(stream(midway=midway))
    client = await gateway(up)
    resp = await client.post("/v1/chat/completions", json={**BODY, "stream": True}, headers=USE)
    await resp.content.readany()
    resp.close()
    await wait_until(lambda: up.disconnects == 1)  # the upstream request was cancelled
    await wait_until(lambda: client.app[CACHED].flights == {})
    assert client.app[CACHED].cache.backend.keys() == []
    midway.set()


async def test_a_graceful_shutdown_ends_every_client_of_a_shared_call(upstreams):
    up = await upstreams("openai")
    midway = asyncio.Event()
    up.then(stream(midway=midway))
    app = create_app(Settings(providers=provider_configs(up)), probes=False)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/chat/completions"
        async with aiohttp.ClientSession() as session:
            body = {**BODY, "stream": True}
            first = await session.post(url, json=body, headers=USE)
            await first.content.readany()  # committed
            follower = await session.post(url, json=body, headers=USE)
            waiting = asyncio.create_task(session.post(url, json=BODY, headers=USE))
            await wait_until(lambda: readers(app) == 3)
            await drain(runner, 0.1)
            for resp in (first, follower):
                events = (await resp.read()).split(b"\n\n")
                assert b'"code":"shutting_down"' in events[-2] and b"[DONE]" not in events[-2]
            answer = await waiting
            assert answer.status == 503
            assert (await answer.json())["error"]["code"] == "shutting_down"
        await wait_until(lambda: up.disconnects == 1)  # the upstream call was cancelled too
    finally:
        midway.set()
        await runner.cleanup()
