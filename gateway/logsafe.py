"""Strings from clients and upstreams, made safe for a log line.

A model name, a path or an upstream's error message can carry CR, LF, ANSI escape
sequences or Unicode line separators: written as they are, they forge whole log lines
(``...\\n2026-01-01 WARNING gateway: ...``) or rewrite a terminal. :func:`escape` turns
every character that is not printable into a visible escape such as ``\\n`` or ``\\x1b``,
and :class:`SafeFormatter` does it for every message a handler writes.
"""

from __future__ import annotations

import logging

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(c: str) -> str:
    named = _NAMED.get(c)
    if named is not None:
        return named
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text: str, limit: int | None = None) -> str:
    """``text`` with every non-printable character escaped, cut to ``limit`` characters
    first when given.

    Non-printable is Python's meaning (``str.isprintable``): C0 and C1 controls (CR, LF,
    ESC, NEL), DEL, line and paragraph separators and format characters such as bidi
    overrides. Plain text comes back unchanged (the same object), so the common case costs
    one scan.
    """
    if limit is not None and len(text) > limit:
        text = text[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape_char(c) for c in text)


class SafeFormatter(logging.Formatter):
    """A formatter that escapes the message, so no log call can write more than one line
    (or a terminal escape) whatever its arguments hold. Tracebacks keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The formatted line, with ``record.message`` escaped for this handler only."""
        message = record.message
        safe = escape(message)
        if safe is message:
            return super().formatMessage(record)
        record.message = safe  # other handlers of the record see the original again
        try:
            return super().formatMessage(record)
        finally:
            record.message = message
