"""What a dialect provides: the translation between the gateway and one kind of API."""

from __future__ import annotations

from typing import Any, Protocol


class Dialect(Protocol):
    """Translates the gateway's OpenAI-shaped requests for one kind of upstream API."""

    endpoints: frozenset[str]

    def url(self, base_url: str, endpoint: str) -> str:
        """The upstream URL for an OpenAI endpoint path such as ``chat/completions``."""
        ...

    def models_url(self, base_url: str) -> str:
        """The URL health probes poll."""
        ...

    def headers(self, api_key: str | None) -> dict[str, str]:
        """Headers for every upstream request."""
        ...

    def request_body(self, body: dict[str, Any], raw: bytes, model: str) -> bytes:
        """The encoded upstream request for ``model``."""
        ...
