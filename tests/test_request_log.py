"""The request log line: the same line through logging or straight to the stream."""

from __future__ import annotations

import asyncio
import io
import logging
import re

import aiohttp

from gateway.request_log import RequestLog
from tests.conftest import PROVIDER_KEY, chat, gateway_process, process_env

LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO gateway: request id=(\S+) model=(\S+) "
    r"stream=(true|false) provider=(\S+) status=(\d+) outcome=(\S+) attempts=(\d+) "
    r"chain=(\S*) latency_ms=[\d.]+ ttft_ms=(\S+) tokens=(\S+) worker=(\d+)$"
)


async def test_an_attached_log_writes_once_per_loop_turn():
    stream = io.StringIO()
    request_log = RequestLog(logging.getLogger("gateway.test"))
    request_log.attach(stream)
    for n in range(3):
        request_log.write(f"request id=r{n} x=1")
    assert stream.getvalue() == ""  # buffered until the loop turns
    await asyncio.sleep(0)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert all(
        re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO gateway: request id=r\d x=1$", ln)
        for ln in lines
    )


async def test_the_process_writes_one_line_per_request(upstreams, unused_tcp_port):
    a = await upstreams("a")
    env = process_env(OPENAI_BASE_URL=a.url, OPENAI_API_KEY=PROVIDER_KEY)
    async with gateway_process(unused_tcp_port, env) as gw:
        async with aiohttp.ClientSession() as s:
            for stream in (False, True):
                body = chat(stream=stream, model="gpt-4o\r\n2026-01-01\x1b[31mWARNING")
                async with s.post(
                    f"{gw.base}/v1/chat/completions",
                    json=body,
                    headers={"x-request-id": f"rid-{stream}"},
                ) as r:
                    assert r.status == 200
                    await r.read()
        assert await gw.stop() == 0
    lines = [ln for ln in gw.lines if "INFO gateway: request id=" in ln]
    assert len(lines) == 2, gw.log
    for line, stream in zip(lines, ("false", "true"), strict=True):
        m = LINE.match(line)
        assert m, line
        assert m.group(1) == f"rid-{stream == 'true'}"
        assert m.group(2) == "gpt-4o\\r\\n2026-01-01\\x1b[31mWARNING"  # escaped: one line
        assert (m.group(3), m.group(4), m.group(5)) == (stream, "openai", "200")
        assert m.group(8) == "openai:ok"
    assert "\x1b" not in gw.log


async def test_no_request_lines_at_warning(upstreams, unused_tcp_port):
    a = await upstreams("a")
    env = process_env(
        OPENAI_BASE_URL=a.url, OPENAI_API_KEY=PROVIDER_KEY, GATEWAY_LOG_LEVEL="WARNING"
    )
    async with gateway_process(unused_tcp_port, env) as gw:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{gw.base}/v1/chat/completions", json=chat()) as r:
                assert r.status == 200
        assert await gw.stop() == 0
    assert "request id=" not in gw.log
    assert len(a.requests) == 1
