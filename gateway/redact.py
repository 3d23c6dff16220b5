"""Redaction of configured secrets from anything relayed to clients or logged.

An upstream error may quote the request it refused, ``Authorization`` header included;
whatever an upstream says goes through :class:`Redactor` before it reaches a client, an
error message, a breaker cause or a log line. Only failure paths pay for it: a good answer
is passed through untouched.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote

import orjson

MASK = "***"
_MIN_LENGTH = 4  # shorter strings would mangle ordinary words, and no real key is that short


class Redactor:
    """Replaces every configured secret (and its URL- and JSON-escaped forms) with ``***``."""

    __slots__ = ("_bytes", "_texts")

    def __init__(self, secrets: Iterable[str | None]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if not secret or len(secret) < _MIN_LENGTH:
                continue
            forms.add(secret)
            forms.add(quote(secret, safe=""))
            forms.add(orjson.dumps(secret).decode()[1:-1])
        # Longest first, so a secret that contains another is masked whole.
        self._texts = sorted(forms, key=len, reverse=True)
        self._bytes = [f.encode() for f in self._texts]

    def text(self, value: str) -> str:
        """``value`` with every secret masked."""
        for secret in self._texts:
            if secret in value:
                value = value.replace(secret, MASK)
        return value

    def data(self, value: bytes) -> bytes:
        """``value`` (a body) with every secret masked."""
        for secret in self._bytes:
            if secret in value:
                value = value.replace(secret, MASK.encode())
        return value
