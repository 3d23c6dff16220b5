"""SSE framing: line ends, split reads, multi-line data, comments, the size cap."""

from __future__ import annotations

import pytest

from gateway.sse import SSEError, SSEParser


def feed_all(parser, pieces):
    events = []
    for p in pieces:
        events += parser.feed(p)
    return events


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_ends(eol):
    raw = b'data: {"a":1}' + eol + eol + b"data: [DONE]" + eol + eol
    parser = SSEParser()
    events = parser.feed(raw) + parser.finish()
    assert [e.data for e in events] == [b'{"a":1}', b"[DONE]"]
    assert b"".join(e.raw for e in events) == raw


def test_split_anywhere_keeps_exact_bytes():
    raw = b'data: {"x": "y"}\r\n\r\n: keep-alive\n\nevent: error\ndata: line1\ndata: line2\n\n'
    for cut in range(1, len(raw)):
        events = feed_all(SSEParser(), [raw[:cut], raw[cut:]])
        assert [e.data for e in events] == [b'{"x": "y"}', None, b"line1\nline2"]
        assert events[2].name == "error"
        assert b"".join(e.raw for e in events) == raw


def test_byte_by_byte():
    raw = b"data: 1\r\n\r\ndata:2\n\n"
    events = feed_all(SSEParser(), [raw[i : i + 1] for i in range(len(raw))])
    assert [e.data for e in events] == [b"1", b"2"]


def test_partial_event_is_pending():
    p = SSEParser()
    assert p.feed(b'data: {"a"') == []
    assert p.pending() == b'data: {"a"'


def test_event_size_cap():
    p = SSEParser(max_event_bytes=1000)
    with pytest.raises(SSEError):
        p.feed(b"data: " + b"x" * 2000)


def test_large_event_under_cap():
    big = b"x" * 600_000
    events = SSEParser(max_event_bytes=1 << 20).feed(b"data: " + big + b"\n\n")
    assert events[0].data == big
