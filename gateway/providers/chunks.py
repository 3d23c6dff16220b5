"""OpenAI's answer shapes, built by the translators of vendors that speak another API.

A translated stream comes out as ``chat.completion.chunk`` events framed as OpenAI frames
them (``data: {...}`` and a blank line), so that the gateway's one stream state judges
them like any OpenAI stream: the first-token rule, ``finish_reason`` per choice, usage.
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson

from gateway.errors import token_count
from gateway.providers.base import Translator
from gateway.sse import DONE_EVENT, SSEError

# The event the stream state gets for a vendor event that could not be read: not JSON
# either, so it is judged as a malformed OpenAI event would be (fail over before the first
# token, dropped and counted after it).
_UNREADABLE = b"data: {unreadable vendor event}\n\n"
# A vendor's keep-alive, passed on as an SSE comment (the client's connection stays open).
KEEPALIVE = b": ping\n\n"


def usage(prompt: Any, completion: Any, cached: Any = None) -> dict[str, Any] | None:
    """An OpenAI ``usage`` block from a vendor's counts; None when it gave none.

    Counts that are not whole numbers from 0 to 10^9 are left out, as for any upstream.
    """
    p, c = token_count(prompt), token_count(completion)
    if p is None and c is None:
        return None
    out: dict[str, Any] = {"prompt_tokens": p or 0, "completion_tokens": c or 0}
    out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    hit = token_count(cached)
    if hit:
        out["prompt_tokens_details"] = {"cached_tokens": hit}
    return out


def include_usage(body: dict[str, Any]) -> bool:
    """True when the client asked for OpenAI's usage-only chunk at the end of a stream."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def error_object(message: str, type_: str, code: str | None) -> dict[str, Any]:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def completion(
    ident: str, model: str, message: dict[str, Any], finish: str, used: dict[str, Any] | None
) -> bytes:
    """A ``chat.completion`` body with one choice."""
    body: dict[str, Any] = {
        "id": ident,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
    }
    if used is not None:
        body["usage"] = used
    return orjson.dumps(body)


def tool_call(index: int | None, ident: str, name: str, arguments: str) -> dict[str, Any]:
    """One OpenAI tool call (``index`` set in a stream's delta, absent in a message)."""
    call: dict[str, Any] = {
        "id": ident,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
    if index is not None:
        call = {"index": index, **call}
    return call


def call_id() -> str:
    """An id for a tool call whose vendor gave none (clients match results by it)."""
    return "call_" + os.urandom(12).hex()


class Lines:
    """Splits a body into lines (NDJSON), holding at most ``limit`` bytes of a partial one."""

    __slots__ = ("_buf", "_limit")

    def __init__(self, limit: int) -> None:
        self._buf = b""
        self._limit = limit

    def feed(self, chunk: bytes) -> list[bytes]:
        """The complete lines ``chunk`` finishes (blank ones dropped)."""
        data = self._buf + chunk if self._buf else chunk
        lines = data.split(b"\n")
        self._buf = lines.pop()
        if len(self._buf) > self._limit:
            raise SSEError(f"a line exceeds {self._limit} bytes")
        return [line for line in lines if line.strip()]

    def finish(self) -> list[bytes]:
        """The last line, when the body did not end with a newline."""
        rest, self._buf = self._buf, b""
        return [rest] if rest.strip() else []


class Chunks(Translator):
    """The base of a translator that writes OpenAI chunks for another vendor's stream.

    Subclasses implement :meth:`feed`. One choice (index 0); the usage goes on the
    ``finish_reason`` chunk, or (when the client asked with ``stream_options``) in a
    usage-only chunk before ``[DONE]``, as OpenAI sends it.
    """

    __slots__ = ("created", "ident", "include_usage", "model", "started", "used")

    def __init__(self, model: str, include_usage: bool) -> None:
        self.ident = "chatcmpl-" + os.urandom(12).hex()
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.used: dict[str, Any] | None = None
        self.started = False  # the role chunk went out

    def chunk(
        self, delta: dict[str, Any], finish: str | None = None, used: dict[str, Any] | None = None
    ) -> bytes:
        """One ``chat.completion.chunk`` event; the first one also says the role."""
        if not self.started:
            self.started = True
            delta = {"role": "assistant", **delta}
        body: dict[str, Any] = {
            "id": self.ident,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if used is not None:
            body["usage"] = used
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def finish(self, reason: str) -> bytes:
        """The ``finish_reason`` chunk (with the usage, unless the client asked for its own
        usage chunk)."""
        return self.chunk({}, reason, None if self.include_usage else self.used)

    def done(self) -> bytes:
        """The end of the answer: the usage chunk if asked for, then ``[DONE]``."""
        if not (self.include_usage and self.used):
            return DONE_EVENT
        body = {
            "id": self.ident,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.used,
        }
        return b"data: " + orjson.dumps(body) + b"\n\n" + DONE_EVENT

    @staticmethod
    def error_event(err: dict[str, Any]) -> bytes:
        """An in-stream error, as an OpenAI error event (the stream state classifies it)."""
        return b"data: " + orjson.dumps(err) + b"\n\n"

    @staticmethod
    def unreadable() -> bytes:
        """What the stream state gets for a vendor event that is not valid JSON."""
        return _UNREADABLE
