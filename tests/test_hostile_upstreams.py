"""Upstreams that misbehave on purpose: nothing they send reaches further than it should.

Endless bodies, compression bombs and huge error pages are read only up to a bound and
fail over; redirects are never followed; a provider key that an upstream quotes back is
masked everywhere; account headers stay with the operator; a client that stops reading
loses its stream and frees its slot. Memory bounds are measured on a real gateway process
(peak RSS, with a margin of hundreds of MB: a bound, not a timing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import aiohttp
import orjson
import pytest
from prometheus_client import REGISTRY

from gateway.server import ACTIVE, PROVIDERS
from tests import fake_upstream as fu
from tests.conftest import PROVIDER_KEY, chat, gateway_process, peak_rss_mb, process_env
from tests.fake_upstream import wait_until
from tests.test_streaming import read_stream, text_of


async def post(client, body=None, **kw):
    resp = await client.post("/v1/chat/completions", json=body or chat(), **kw)
    return resp, await resp.read()


# -- bodies have bounds ------------------------------------------------------------------

BOUNDED = {
    "endless 500 body": (fu.endless(500, "text/html"), False, "server_error"),
    "endless JSON 200 body": (fu.endless(200), False, "bad_response"),
    "endless text/html 200 to a stream request": (fu.endless(200, "text/html"), True, "bad_response"),
    "gzip bomb (512 MiB inflated)": (fu.bomb(), False, "bad_response"),
    "gzip bomb to a stream request": (fu.bomb(), True, "bad_response"),
    "50 MB error page": (fu.error_page(50 << 20), False, "server_error"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BOUNDED))
async def test_unbounded_bodies_fail_over(name, gateway, upstreams):
    behaviour, stream, outcome = BOUNDED[name]
    a, b = await upstreams("a"), await upstreams("b")
    a.default = behaviour
    client = await gateway(a, b, max_retries=0, response_timeout=30, first_token_timeout=30)
    key = {"provider": "openai", "outcome": outcome}
    before = REGISTRY.get_sample_value("gateway_upstream_attempts_total", key) or 0.0
    resp = await client.post("/v1/chat/completions", json=chat(stream=stream))
    assert resp.status == 200
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    if stream:
        datas, done = await read_stream(resp)
        assert done and text_of(datas) == b.text
    else:
        body = orjson.loads(await resp.read())
        assert body["choices"][0]["message"]["content"] == b.text
    assert client.app[PROVIDERS]["openai"].breaker.fail_counter == 1
    # judged from the body's first bytes, not after reading it to a timeout
    assert REGISTRY.get_sample_value("gateway_upstream_attempts_total", key) == before + 1


async def test_an_answer_over_max_response_bytes_fails_over(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.text = "x" * 5000
    client = await gateway(a, b, settings={"max_response_bytes": 4096})
    resp, body = await post(client)
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert b"x" * 100 not in body


async def test_peak_rss_stays_bounded_with_hostile_upstreams(upstreams, unused_tcp_port, tmp_path):
    """A real gateway process against every unbounded body: RSS stays far below what
    reading them would take (before the bounds: 0.6 to 1.7 GB per case)."""
    bad, good = await upstreams("bad"), await upstreams("good")
    config = tmp_path / "gateway.toml"
    config.write_text("[providers.openai]\nmax_retries = 0\nfail_max = 1000\n")
    env = process_env(
        OPENAI_BASE_URL=bad.url,
        OPENAI_API_KEY=PROVIDER_KEY,
        LMSTUDIO_BASE_URL=good.url,
        LMSTUDIO_MODEL="local-model",
    )
    rounds = [
        (fu.error_page(50 << 20), False, 10),  # ten concurrent 50 MB error pages
        (fu.endless(500, "text/html"), False, 2),
        (fu.endless(200, "text/html"), True, 2),
        (fu.endless(200), False, 2),
        (fu.bomb(), False, 2),
        (fu.bomb(), True, 2),
    ]
    answered = []
    async with gateway_process(unused_tcp_port, env, "--config", str(config)) as gw:
        base = gw.base
        start = peak_rss_mb(gw.proc.pid)
        async with aiohttp.ClientSession() as s:

            async def one(stream):
                async with s.post(f"{base}/v1/chat/completions", json=chat(stream=stream)) as r:
                    await r.read()
                    return r.status, r.headers["x-gateway-provider"]

            for behaviour, stream, n in rounds:
                bad.default = behaviour
                answered += await asyncio.gather(*(one(stream) for _ in range(n)))
        peak = peak_rss_mb(gw.proc.pid)
    assert answered == [(200, "lmstudio")] * 20
    assert len(bad.requests) == 20
    print(f"peak RSS {peak:.0f} MB (at start {start:.0f} MB)")
    assert peak < start + 250, (start, peak)


# -- redirects are never followed -----------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("stream", [False, True])
async def test_redirects_are_not_followed(status, stream, gateway, upstreams):
    a, b, elsewhere = await upstreams("a"), await upstreams("b"), await upstreams("elsewhere")
    a.default = fu.redirect(status, f"{elsewhere.url}/chat/completions")
    client = await gateway(a, b)
    resp, _ = await post(client, chat(stream=stream))
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert elsewhere.requests == [] and elsewhere.connections == 0


async def test_probes_do_not_follow_redirects(gateway, upstreams):
    a, elsewhere = await upstreams("a"), await upstreams("elsewhere")
    a.models_location = f"{elsewhere.url}/models"
    client = await gateway(a)
    result = await client.app[PROVIDERS]["openai"].prober.probe_once()
    assert result.error == "HTTP 302"
    assert elsewhere.probes == 0


# -- secrets never leave ------------------------------------------------------------------


async def test_a_quoted_key_is_masked_in_a_passed_through_error(gateway, upstreams, caplog):
    caplog.set_level(logging.DEBUG)
    a = await upstreams("a")
    a.default = fu.echo_key(400)  # a client_error: returned to the client as is
    client = await gateway(a)
    resp, body = await post(client)
    assert resp.status == 400
    assert PROVIDER_KEY.encode() not in body
    assert b"Bearer ***" in body
    assert PROVIDER_KEY not in caplog.text


async def test_a_quoted_key_is_masked_in_the_all_failed_answer(gateway, upstreams, caplog):
    caplog.set_level(logging.DEBUG)
    a, b = await upstreams("a"), await upstreams("b")
    a.default = b.default = fu.echo_key(401)
    client = await gateway(a, b)
    resp, body = await post(client)
    assert resp.status == 503
    message = orjson.loads(body)["error"]["message"]
    assert PROVIDER_KEY not in message and "Bearer ***" in message
    report = await (await client.get("/admin/providers")).read()
    assert PROVIDER_KEY.encode() not in report
    assert PROVIDER_KEY not in caplog.text


async def test_a_quoted_key_is_masked_in_a_stream_error_event(gateway, upstreams, caplog):
    caplog.set_level(logging.DEBUG)
    a = await upstreams("a")
    a.default = fu.echo_key_event()
    client = await gateway(a)
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    raw = await resp.read()
    assert b"stream_interrupted" in raw
    assert PROVIDER_KEY.encode() not in raw and b"Bearer ***" in raw
    assert PROVIDER_KEY not in caplog.text


# -- account headers ---------------------------------------------------------------------

ACCOUNT = {
    "openai-organization": "org-operator",
    "openai-project": "proj_operator",
    "openai-processing-ms": "12",
    "x-ratelimit-limit-requests": "500",
}


async def test_account_headers_are_not_passed_on(gateway, upstreams):
    a = await upstreams("a")
    a.default = fu.ok(headers=ACCOUNT)
    client = await gateway(a)
    resp, _ = await post(client)
    assert "openai-organization" not in resp.headers
    assert "openai-project" not in resp.headers
    assert resp.headers["openai-processing-ms"] == "12"
    assert resp.headers["x-ratelimit-limit-requests"] == "500"


async def test_ratelimit_headers_can_be_withheld(gateway, upstreams):
    a = await upstreams("a")
    a.default = fu.ok(headers=ACCOUNT)
    client = await gateway(a, settings={"pass_ratelimit_headers": False})
    resp, _ = await post(client)
    assert not any(h.lower().startswith("x-ratelimit-") for h in resp.headers)


# -- a client that stops reading ---------------------------------------------------------


def stalled_client(port: int, body: bytes) -> socket.socket:
    """A client that sends a request and never reads a byte (its receive buffer small)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


async def test_a_client_that_stops_reading_loses_its_stream_and_frees_its_slot(gateway, upstreams):
    a = await upstreams("a")
    # 32 MB of events: far more than the socket buffers between gateway and client hold
    a.then(fu.sse(fu.chunk("x" * 100_000) * 320 + fu.chunk(finish="stop")))
    client = await gateway(
        a, max_concurrency=1, max_queue=0, settings={"send_timeout": 0.5}, idle_timeout=30
    )
    provider = client.app[PROVIDERS]["openai"]
    sock = stalled_client(client.port, orjson.dumps(chat(stream=True)))
    try:
        await wait_until(lambda: len(a.requests) == 1)
        await wait_until(lambda: a.disconnects == 1, timeout=15)  # upstream cancelled
        await wait_until(lambda: provider.limiter.in_use == 0)
        assert provider.breaker.fail_counter == 0  # not the provider's fault
        resp, body = await post(client)  # the slot serves the next request
        assert resp.status == 200 and resp.headers["x-gateway-provider"] == "openai"
    finally:
        sock.close()


async def test_a_large_answer_to_a_client_that_stops_reading_is_dropped(gateway, upstreams):
    a = await upstreams("a")
    a.text = "y" * (8 << 20)
    client = await gateway(a, settings={"send_timeout": 0.5})
    sock = stalled_client(client.port, orjson.dumps(chat()))
    try:
        await wait_until(lambda: len(a.requests) == 1)
        await wait_until(lambda: not client.app[ACTIVE], timeout=15)  # the handler gave up
        received = 0
        sock.settimeout(5)
        with contextlib.suppress(OSError):  # reset by the gateway, or EOF
            while piece := sock.recv(1 << 20):
                received += len(piece)
        assert received < 8 << 20  # the connection was dropped, not the body delivered
    finally:
        sock.close()
