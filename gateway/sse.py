"""Incremental server-sent events framing.

Upstream bodies arrive in arbitrary pieces (``resp.content.iter_any()``); the parser
frames them into events while keeping each event's exact bytes, so that after commit
the relay can forward what it received without re-encoding. CR, LF and CRLF line ends,
multi-line ``data:`` fields and ``:`` comments are handled, and an event larger than
``max_event_bytes`` is an error rather than unbounded buffering.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

_LINE_END = re.compile(rb"\r\n|\r|\n")
DONE = b"[DONE]"


class SSEError(ValueError):
    """The upstream stream is not valid SSE (or an event is too large)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One SSE event: its exact bytes (terminator included) and its parsed fields."""

    raw: bytes
    data: bytes | None  # None for an event with no data field (a comment, a keep-alive)
    name: str | None = None


class SSEParser:
    """Feed bytes in, get complete events out."""

    __slots__ = ("_buf", "_data", "_event_start", "_max", "_name", "_scan")

    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        self._buf = bytearray()
        self._max = max_event_bytes
        self._scan = 0  # where the next line starts in _buf
        self._event_start = 0
        self._data: list[bytes] = []
        self._name: str | None = None

    def feed(self, chunk: bytes, final: bool = False) -> list[Event]:
        """Add ``chunk`` and return every event it completes."""
        buf = self._buf
        buf += chunk
        events: list[Event] = []
        pos = self._scan
        n = len(buf)
        has_cr = b"\r" in buf  # almost never: then plain find() is the fast path
        while pos < n:
            if has_cr:
                m = _LINE_END.search(buf, pos)
                if m is None:
                    break
                start, end = m.span()
                if end == n and end - start == 1 and buf[start] == 0x0D and not final:
                    break  # a CR at the end may be the first half of a CRLF
            else:
                start = buf.find(b"\n", pos)
                if start < 0:
                    break
                end = start + 1
            if start > pos:
                self._field(buf, pos, start)
                pos = end
                continue
            pos = end
            data = self._data
            events.append(
                Event(
                    bytes(buf[self._event_start : pos]),
                    (data[0] if len(data) == 1 else b"\n".join(data)) if data else None,
                    self._name,
                )
            )
            self._data = []
            self._name = None
            self._event_start = pos
        # Drop what has been framed so the buffer holds one partial event at most.
        if self._event_start:
            del buf[: self._event_start]
            pos -= self._event_start
            self._event_start = 0
        self._scan = pos
        if len(buf) > self._max:
            raise SSEError(f"an SSE event exceeds {self._max} bytes")
        return events

    def _field(self, buf: bytearray, start: int, end: int) -> None:
        """One non-empty line, ``buf[start:end]``; only ``data`` and ``event`` matter."""
        if buf.startswith(b"data:", start):
            value = start + 5
        elif buf.startswith(b"event:", start):
            value = start + 6
            if buf.startswith(b" ", value):
                value += 1
            self._name = buf[value:end].decode("utf-8", "replace")
            return
        else:
            return  # a comment (":"), "id", "retry" or an unknown field
        if buf.startswith(b" ", value):
            value += 1
        self._data.append(bytes(buf[value:end]))

    def feed_lf(self, chunk: bytes) -> tuple[bytes, list[bytes]] | None:
        """Frame ``chunk`` the fast way: every event it completes, as one slice of bytes
        (terminators included) and as the list of their texts (without the blank line).

        For the common case after commit (LF line ends, the parser between events): a few
        byte searches in C instead of a Python loop per line and an object per event.
        None when this read needs :meth:`feed` (a CR, or an event partly parsed already);
        the two may alternate freely.
        """
        if self._scan or self._data or self._name is not None or b"\r" in chunk:
            return None
        buf = self._buf
        whole = bytes(buf) + chunk if buf else chunk
        if whole.startswith(b"\n"):  # a blank line between events: feed() passes it on
            return None
        end = whole.rfind(b"\n\n")
        if end < 0:
            buf += chunk
            if len(buf) > self._max:
                raise SSEError(f"an SSE event exceeds {self._max} bytes")
            return b"", []
        end += 2
        del buf[:]
        if end < len(whole):
            buf += whole[end:]
            if len(buf) > self._max:
                raise SSEError(f"an SSE event exceeds {self._max} bytes")
        complete = whole[:end] if end < len(whole) else whole
        return complete, complete[:-2].split(b"\n\n")

    def finish(self) -> list[Event]:
        """At end of stream: complete what a final lone CR was holding back."""
        return self.feed(b"", final=True) if self._buf.endswith(b"\r") else []

    def pending(self) -> bytes:
        """Bytes received that do not yet form a complete event."""
        return bytes(self._buf)


def encode_data(payload: bytes) -> bytes:
    """Frame one ``data:`` event."""
    return b"data: " + payload + b"\n\n"


def error_event(message: str, type_: str = "upstream_error", code: str | None = None) -> bytes:
    """The SSE event that ends a stream that failed after commit."""
    body = orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})
    return encode_data(body)


DONE_EVENT = encode_data(DONE)
