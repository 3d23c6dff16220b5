"""The OpenAI-compatible dialect: OpenAI, LM Studio, Ollama's /v1, vLLM, llama.cpp."""

from __future__ import annotations

from typing import Any

import orjson


class OpenAIDialect:
    """Requests go out as the client sent them, with the upstream's model and key."""

    endpoints = frozenset({"chat/completions", "completions", "embeddings"})

    def url(self, base_url: str, endpoint: str) -> str:
        """The upstream URL of ``endpoint`` (``base_url`` ends in ``/v1``)."""
        return f"{base_url}/{endpoint}"

    def models_url(self, base_url: str) -> str:
        """Where the health probe lists models."""
        return f"{base_url}/models"

    def headers(self, api_key: str | None) -> dict[str, str]:
        """Request headers; the client's own ``Authorization`` is never forwarded."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        return headers

    def request_body(self, body: dict[str, Any], raw: bytes, model: str) -> bytes:
        """The body to send: the client's bytes untouched when the model is unchanged."""
        if body.get("model") == model:
            return raw
        return orjson.dumps({**body, "model": model})
