"""Logs are not writable by clients or upstreams: CR, LF, ANSI escapes and other
non-printable characters are escaped (issue 11, item 8)."""

from __future__ import annotations

import logging

import aiohttp
import orjson
import pytest

from gateway.logsafe import SafeFormatter, escape
from tests import fake_upstream as fu
from tests.conftest import chat, gateway_process, process_env

FORGED = "\n2026-01-01 00:00:00,000 WARNING gateway: forged"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("naïve 模型 🙂", "naïve 模型 🙂"),  # printable Unicode stays as it is
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("x\x00\x7f\x85y", "x\\x00\\x7f\\x85y"),  # NUL, DEL, NEL (a C1 line break)
        ("a\u2028b\u2029c", "a\\u2028b\\u2029c"),  # Unicode line and paragraph separators
        ("evil\u202etxt.exe", "evil\\u202etxt.exe"),  # a bidi override
    ],
)
def test_escape(text, shown):
    assert escape(text) == shown
    assert len(escape(text).splitlines()) <= 1


def test_escape_cuts_before_escaping():
    assert escape("ab\ncd", limit=3) == "ab\\n"


def test_formatter_writes_one_line_per_record():
    formatter = SafeFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord("gateway", logging.INFO, __file__, 1, "model=%s", (FORGED,), None)
    line = formatter.format(record)
    assert line == "INFO gateway: model=\\n2026-01-01 00:00:00,000 WARNING gateway: forged"
    assert record.getMessage() == "model=" + FORGED  # the record itself is left alone


async def test_model_name_cannot_forge_a_log_line(gateway, upstreams, caplog):
    a = await upstreams("a")
    client = await gateway(a)
    with caplog.at_level(logging.INFO, logger="gateway"):
        resp = await client.post(
            "/v1/chat/completions", json=chat(model="gpt-4o-mini" + FORGED + "\x1b[2J")
        )
        assert resp.status == 200
    mentions = [r.getMessage() for r in caplog.records if "forged" in r.getMessage()]
    assert len(mentions) == 1  # the request's own line, and nothing else
    assert mentions[0].startswith("request id=")
    assert "\n" not in mentions[0] and "\x1b" not in mentions[0]
    assert "model=gpt-4o-mini\\n2026-01-01" in mentions[0]


async def test_gateway_process_log_has_one_line_per_request(upstreams, unused_tcp_port):
    """The real process: a forged model name and a forged upstream error message (logged
    when a stream fails after commit) each stay on their own line."""
    a = await upstreams("a")
    error = {"error": {"message": "cut" + FORGED + "-by-upstream\x1b]0;owned\x07"}}
    a.then(fu.ok(), fu.sse(fu.chunk("Hi") + b"data: " + orjson.dumps(error) + b"\n\n"))
    env = process_env(OPENAI_BASE_URL=a.url, OPENAI_API_KEY="sk-x")
    async with gateway_process(unused_tcp_port, env) as gw:
        async with aiohttp.ClientSession() as s:
            body = chat(model="gpt-4o-mini" + FORGED + "-by-client\x1b[2J")
            async with s.post(f"{gw.base}/v1/chat/completions", json=body) as r:
                assert r.status == 200
            async with s.post(f"{gw.base}/v1/chat/completions", json=chat(stream=True)) as r:
                assert "stream_interrupted" in await r.text()
        assert await gw.stop() == 0
    log = gw.log
    lines = log.splitlines()
    assert not [line for line in lines if line.startswith("2026-01-01")]
    assert len([line for line in lines if "forged-by-client" in line]) == 1
    assert len([line for line in lines if "forged-by-upstream" in line]) == 1  # the warning
    assert "\x1b" not in log and "\x07" not in log
