"""Client connections are bounded (issue 11, items 4 and 9), against a real
``python -m gateway`` and raw loopback sockets: headers and bodies must arrive in time,
idle connections are closed, open connections are capped, a stalled body does not hold
up shutdown, and malformed HTTP gets an OpenAI-shaped 400 and one log line.

The timeouts under test are set to 0.5 s and every wait for an outcome is bounded by
``CLOSE_WAIT`` (20 s): a connection the gateway never closes fails the test, and no test
asserts how long anything took.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.hostile_clients import (
    CHAT_HEAD,
    CLOSE_WAIT,
    connect,
    gateway_process,
    open_client_sockets,
    parse_answer,
    read_until_closed,
    trickle,
)


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def event_loop_kind(request, monkeypatch):
    """Each test against a gateway on either event loop: the connection layer relies on
    when aiohttp's protocol sees its first bytes, and uvloop delivers them sooner."""
    monkeypatch.setenv("GATEWAY_EVENT_LOOP", request.param)
    return request.param


async def healthy(gw) -> bool:
    """A normal client is served (on a fresh connection)."""
    try:
        async with aiohttp.ClientSession() as s, s.get(f"{gw.base}/healthz") as r:
            return r.status == 200
    except aiohttp.ClientConnectionError:  # refused over the cap, before any answer
        return False


async def test_trickling_headers_silent_and_idle_connections_are_closed(upstreams, unused_tcp_port):
    a = await upstreams("a")
    env = {"GATEWAY_CLIENT_HEADER_TIMEOUT": "0.5", "GATEWAY_KEEPALIVE_TIMEOUT": "0.5"}
    async with gateway_process(unused_tcp_port, a.url, **env) as gw:
        halted = []
        for _ in range(20):  # half a head at once, then nothing
            r, w = await connect(gw.port)
            w.write(CHAT_HEAD + b"X-Half: a")
            halted.append((r, w))
        trickling = [await connect(gw.port) for _ in range(20)]
        slow_head = CHAT_HEAD + b"X-Slow: " + b"a" * 1000  # 50 s at this pace
        senders = [asyncio.create_task(trickle(w, slow_head, 0.05)) for _, w in trickling]
        silent = [await connect(gw.port) for _ in range(20)]
        idle_r, idle_w = await connect(gw.port)  # one good request, then left idle
        idle_w.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        conns = [*halted, *trickling, *silent, (idle_r, idle_w)]
        got = await asyncio.gather(*(read_until_closed(r) for r, _ in conns))
        for task in senders:
            task.cancel()
        for _, w in conns:
            w.close()
        assert await healthy(gw)
        assert await gw.stop() == 0
    # Closed, all of them. A request that had begun is told why it ends (a client still
    # sending when the gateway hangs up may get a reset instead of the answer).
    for i, data in enumerate(got[:40]):
        if data or i < 20:  # the halted ones send nothing more: their answer arrives
            answer = parse_answer(data)
            assert answer.status == 408
            assert answer.error()["code"] == "request_timeout"
            assert answer.headers["connection"] == "close"
    assert got[40:60] == [b""] * 20  # nothing was asked: closed without a word
    assert parse_answer(got[60]).status == 200  # answered, then closed once idle
    assert "Traceback" not in gw.log


async def test_stalled_body_gets_408(upstreams, unused_tcp_port):
    a = await upstreams("a")
    async with gateway_process(unused_tcp_port, a.url, GATEWAY_CLIENT_BODY_TIMEOUT="0.5") as gw:
        conns = [await connect(gw.port) for _ in range(20)]
        for _, w in conns:
            w.write(CHAT_HEAD + b"Content-Length: 1000\r\n\r\n" + b'{"model": "gpt-4o-mini"')
        got = await asyncio.gather(*(read_until_closed(r) for r, _ in conns))
        for _, w in conns:
            w.close()
        assert await healthy(gw)
        assert await gw.stop() == 0
    for data in got:
        answer = parse_answer(data)
        assert answer.status == 408
        assert answer.error()["code"] == "request_timeout"
    assert a.requests == []  # nothing half-read went upstream
    assert "Traceback" not in gw.log


async def test_slow_but_steady_body_is_not_cut(upstreams, unused_tcp_port):
    """The body timeout bounds the gap between reads (nginx's client_body_timeout), not
    the whole upload: this body takes longer than the timeout but never pauses that long."""
    a = await upstreams("a")
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    async with gateway_process(unused_tcp_port, a.url, GATEWAY_CLIENT_BODY_TIMEOUT="2") as gw:
        r, w = await connect(gw.port)
        w.write(CHAT_HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body[:40])
        await trickle(w, body[40:], 0.1)  # over 3 s in all, 0.1 s at a time
        answer = parse_answer(await asyncio.wait_for(r.readuntil(b'"stop"'), CLOSE_WAIT))
        w.close()
    assert answer.status == 200
    assert len(a.requests) == 1


async def test_open_connections_are_capped(upstreams, unused_tcp_port):
    a = await upstreams("a")
    env = {"GATEWAY_MAX_CLIENT_CONNECTIONS": "10", "GATEWAY_CLIENT_HEADER_TIMEOUT": "60"}
    async with gateway_process(unused_tcp_port, a.url, **env) as gw:
        pid = gw.proc.pid
        conns = [await connect(gw.port) for _ in range(30)]
        reads = [asyncio.create_task(read_until_closed(r)) for r, _ in conns]
        most = 0
        async with asyncio.timeout(CLOSE_WAIT):  # until every connection is placed
            while True:
                held = open_client_sockets(pid, gw.port)
                most = max(most, held)
                if held + sum(t.done() for t in reads) >= len(conns):
                    break
                await asyncio.sleep(0.02)
        refused = [t.result() for t in reads if t.done()]
        for _, w in conns:
            w.close()
        for t in reads:
            t.cancel()
        async with asyncio.timeout(CLOSE_WAIT):  # the slots come back as clients leave
            while True:
                if await healthy(gw):
                    break
                await asyncio.sleep(0.05)
        assert await gw.stop() == 0
    # Held: the connections not refused. (The count of the gateway's sockets may also
    # catch a refused one between its answer and its close: it is only a sanity bound.)
    assert len(conns) - len(refused) <= 10
    assert most <= 10 + 2
    assert len(refused) >= 20
    for data in refused:
        if data:  # a reset may beat the answer to a client that has sent nothing
            answer = parse_answer(data)
            assert answer.status == 503
            assert answer.error()["code"] == "too_many_connections"
    warnings = [line for line in gw.lines if "max_client_connections" in line]
    assert 1 <= len(warnings) < len(refused)  # said, but not once per connection


async def test_stalled_body_does_not_delay_exit_past_the_grace(upstreams, unused_tcp_port):
    a = await upstreams("a")
    async with gateway_process(unused_tcp_port, a.url, GATEWAY_SHUTDOWN_GRACE="0.5") as gw:
        r, w = await connect(gw.port)
        # Expect: 100-continue tells us when the handler has the request (and waits for
        # the body), so SIGTERM comes during the stall, not before it.
        w.write(CHAT_HEAD + b"Expect: 100-continue\r\nContent-Length: 1000\r\n\r\n")
        assert await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), CLOSE_WAIT) == (
            b"HTTP/1.1 100 Continue\r\n\r\n"
        )
        w.write(b'{"model": ')
        await w.drain()
        # client_body_timeout (60 s) and aiohttp's own shutdown wait (60 s) are both far
        # beyond this bound: only the grace can end the request in time.
        assert await gw.stop(wait=CLOSE_WAIT) == 0
        data = await read_until_closed(r)
        w.close()
    answer = parse_answer(data)
    assert answer.status == 503
    assert answer.error()["code"] == "shutting_down"


MARK = b"EVILMARK"
MALFORMED = {
    "bare CR in a header value": b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-A: "
    + MARK
    + b"\rb\r\n\r\n",
    "NUL in a header value": b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-A: " + MARK + b"\x00\r\n\r\n",
    "ESC in a header value": b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-A: \x1b[2J"
    + MARK
    + b"\r\n\r\n",
    "bad header name": b"GET /healthz HTTP/1.1\r\nHost: gw\r\n" + MARK + b"(x): b\r\n\r\n",
    "space before the colon": b"GET /healthz HTTP/1.1\r\nHost : " + MARK + b"\r\n\r\n",
    "Content-Length with Transfer-Encoding": CHAT_HEAD
    + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\nX-M: "
    + MARK
    + b"\r\n\r\n0\r\n\r\n",
    "two Content-Lengths": CHAT_HEAD + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "bad Content-Length": CHAT_HEAD + b"Content-Length: 1" + MARK + b"\r\n\r\n",
    "request line of 20 KB": b"GET /" + MARK + b"a" * 20000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n",
    "header of 20 KB": b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-A: " + MARK * 2500 + b"\r\n\r\n",
    "200 headers": b"GET /healthz HTTP/1.1\r\n"
    + b"".join(b"X-%d: %s\r\n" % (i, MARK) for i in range(200))
    + b"\r\n",
    "bad HTTP version": b"GET /" + MARK + b" HTTP/9.9\r\nHost: gw\r\n\r\n",
    "bad method": b"G(T /" + MARK + b" HTTP/1.1\r\n\r\n",
    "bad chunk size": CHAT_HEAD
    + b"Transfer-Encoding: chunked\r\n\r\n"
    + MARK
    + b"\r\n{}\r\n0\r\n\r\n",
    "TLS on the HTTP port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
}


async def test_malformed_http_gets_an_openai_400_and_one_log_line(upstreams, unused_tcp_port):
    a = await upstreams("a")
    answers = {}
    async with gateway_process(unused_tcp_port, a.url) as gw:
        for name, raw in MALFORMED.items():
            r, w = await connect(gw.port)
            w.write(raw)
            answers[name] = await read_until_closed(r)
            w.close()
        assert await healthy(gw)
        assert await gw.stop() == 0
    for name, data in answers.items():
        answer = parse_answer(data)
        assert answer.status == 400, name
        err = answer.error()
        assert err["type"] == "invalid_request_error" and err["code"] == "invalid_http_request"
        assert MARK not in data, name  # the client's bytes are not echoed
    assert "Traceback" not in gw.log
    logged = [line for line in gw.lines if "malformed HTTP request" in line]
    assert len(logged) == len(MALFORMED)
    assert not [line for line in gw.lines if "EVILMARK" in line or "\x1b" in line]


async def test_malformed_chunk_after_the_headers_is_a_400(upstreams, unused_tcp_port):
    """A body that turns bad after the handler started reading it: a 400 from the body
    reader, not a 500 and a traceback."""
    a = await upstreams("a")
    async with gateway_process(unused_tcp_port, a.url) as gw:
        r, w = await connect(gw.port)
        w.write(CHAT_HEAD + b"Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n")
        await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), CLOSE_WAIT)  # 100 Continue
        w.write(b'5\r\n{"mod\r\n' + MARK + b"\r\n")
        data = await read_until_closed(r)
        w.close()
        assert await gw.stop() == 0
    answer = parse_answer(data)
    assert answer.status == 400
    assert answer.error()["code"] == "invalid_http_request"
    assert MARK not in data
    assert "Traceback" not in gw.log
    assert a.requests == []
