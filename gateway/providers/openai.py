"""The OpenAI-compatible dialect: OpenAI, LM Studio, Ollama's /v1, vLLM, llama.cpp.

Requests go out as the client sent them, with the upstream's model and key, and answers
come back through the identity translator: their bytes pass untouched.

OpenAI-compatible is not one thing, so two per-provider compatibility options (on by
default for LM Studio and Ollama) fix what local servers do differently:

* ``map_max_completion_tokens``: llama.cpp ignores ``max_completion_tokens`` (the only
  cap LangChain 1.x sends), so a 50-token request can generate thousands; it is sent as
  ``max_tokens`` when the client sets no ``max_tokens`` itself.
* ``dedupe_tool_call_names``: llama.cpp repeats a tool call's ``id`` and function
  ``name`` in every delta, so clients that join the deltas build
  ``get_weatherget_weather``; the repeats are dropped. This one rewrites a stream, so it
  runs only for streaming requests that offer tools, and costs nothing otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from breakers.probes import model_ids as openai_model_ids
from gateway.providers.base import IDENTITY, Outgoing, Translator
from gateway.sse import SSEParser

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.config import ProviderConfig


class OpenAIDialect:
    """OpenAI's own API and the servers that copy it."""

    endpoints = frozenset({"chat/completions", "completions", "embeddings"})
    base_path = "/v1"  # what a configured base URL is made to end in
    judges_models = True  # for a configured model: LM Studio and Ollama list what they serve
    running_url = None
    model_ids = staticmethod(openai_model_ids)

    def __init__(self, config: ProviderConfig, max_event_bytes: int) -> None:
        base = config.base_url  # ends in /v1
        self.models_url = f"{base}/models"
        self._urls = {endpoint: f"{base}/{endpoint}" for endpoint in self.endpoints}
        self._map_max = config.map_max_completion_tokens
        self._dedupe = config.dedupe_tool_call_names
        self._max_event = max_event_bytes

    def headers(self, api_key: str | None) -> dict[str, str]:
        """Request headers; the client's own ``Authorization`` is never forwarded."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        return headers

    def request(self, call: Call, model: str) -> Outgoing:
        """The client's bytes untouched when nothing needs to change."""
        translator = self._answers(call) if self._dedupe else IDENTITY
        return self._urls[call.endpoint], self._body(call, model), translator

    def _body(self, call: Call, model: str) -> bytes:
        body = call.body
        changes: dict[str, Any] = {}
        if body.get("model") != model:
            changes["model"] = model
        if self._map_max and "max_completion_tokens" in body and "max_tokens" not in body:
            changes["max_tokens"] = body["max_completion_tokens"]
        if not changes:
            return call.raw
        new = {**body, **changes}
        if "max_tokens" in changes:
            del new["max_completion_tokens"]
        return orjson.dumps(new)

    def _answers(self, call: Call, translator: Translator = IDENTITY) -> Translator:
        """``translator``, unless a stream offering tools needs its repeats dropped."""
        body = call.body
        if self._dedupe and call.stream and (body.get("tools") or body.get("functions")):
            return ToolCallRepeats(self._max_event, translator)
        return translator


class ToolCallRepeats(Translator):
    """Drops what a server repeats in every delta of one tool call: its ``id`` and its
    function ``name`` (llama.cpp). Events without ``"tool_calls"`` pass as they came;
    ``answer`` and ``error`` are those of ``inner`` (the dialect's own)."""

    __slots__ = ("_inner", "_parser", "_sent")

    def __init__(self, max_event_bytes: int, inner: Translator = IDENTITY) -> None:
        self._parser = SSEParser(max_event_bytes)
        self._sent: dict[tuple[Any, Any], tuple[Any, Any]] = {}  # -> (id, name) sent
        self._inner = inner

    def headers(self, headers: Any) -> Any:
        """The dialect's own header translation."""
        return self._inner.headers(headers)

    def answer(self, body: bytes) -> bytes:
        """The dialect's own answer translation (a stream has no complete body)."""
        return self._inner.answer(body)

    def error(self, status: int, body: bytes) -> bytes:
        """The dialect's own error translation."""
        return self._inner.error(status, body)

    def feed(self, chunk: bytes, end: bool) -> bytes:
        """The stream's bytes, with repeated tool-call ids and names dropped."""
        parser = self._parser
        out = []
        for event in parser.feed(chunk) if chunk else parser.finish():
            data = event.data
            if data is not None and b'"tool_calls"' in data:
                try:
                    obj = orjson.loads(data)
                except orjson.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict) and self._drop_repeats(obj):
                    out.append(b"data: " + orjson.dumps(obj) + b"\n\n")
                    continue
            out.append(event.raw)
        if end:  # a partial event goes on as it came: the stream state judges it
            out.append(parser.pending())
        return b"".join(out)

    def _drop_repeats(self, obj: dict[str, Any]) -> bool:
        """Remove repeated ids and names from ``obj``'s tool-call deltas; True if any."""
        changed = False
        choices = obj.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            calls = delta.get("tool_calls") if isinstance(delta, dict) else None
            for call in calls if isinstance(calls, list) else ():
                if not isinstance(call, dict):
                    continue
                fn = call.get("function")
                name = fn.get("name") if isinstance(fn, dict) else None
                key = (_hashable(choice.get("index", 0)), _hashable(call.get("index", 0)))
                sent = self._sent.get(key)
                if sent is None:
                    self._sent[key] = (call.get("id"), name)
                    continue
                if "id" in call and call["id"] == sent[0]:
                    del call["id"]
                    changed = True
                if name is not None and name == sent[1]:
                    del fn["name"]
                    changed = True
        return changed


def _hashable(value: Any) -> Any:
    return value if isinstance(value, int | str) else repr(value)
