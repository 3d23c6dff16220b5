"""Anthropic's Messages API (``POST /v1/messages``, ``x-api-key``, ``anthropic-version``)
behind the OpenAI API.

The request: system and developer messages become ``system``; user, assistant and tool
messages become alternating ``user``/``assistant`` turns of content blocks (consecutive
turns of one role merged; an assistant's ``tool_calls`` become ``tool_use`` blocks, a
``tool`` message a ``tool_result`` block); images (data URLs and https URLs) become
``image`` blocks; ``max_completion_tokens``/``max_tokens`` (required by Anthropic: the
provider's ``default_max_tokens`` when the client sends none), ``stop``, ``temperature``
(capped at 1, Anthropic's top), ``top_p`` (unless a temperature is set too: Anthropic's
recent models take one of them), ``tools``, ``tool_choice``,
``parallel_tool_calls`` and ``user`` are carried over. ``n > 1``, ``logprobs``, a JSON
``response_format``, audio output and other content parts cannot be expressed: the
provider is skipped as ``unsupported``. Other parameters (``seed``, penalties,
``logit_bias``, ...) are dropped.

The answer: a message becomes a ``chat.completion``, a stream ``chat.completion.chunk``
events (``message_start`` the role chunk, text and ``input_json_delta`` deltas content and
tool-call deltas, thinking ``reasoning_content``, ``message_delta``'s ``stop_reason`` the
``finish_reason``, ``message_stop`` ``[DONE]``, ``ping`` a keep-alive comment, ``error``
an error event), judged by the same rules as any OpenAI stream. Errors get the OpenAI
``code`` that classifies them; ``anthropic-ratelimit-*`` headers become ``x-ratelimit-*``.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from breakers.probes import model_ids as openai_model_ids
from gateway.errors import token_count
from gateway.providers.base import (
    BadAnswer,
    BadRequest,
    Outgoing,
    Unsupported,
    check_common,
    max_tokens,
    stop_list,
    text_of,
)
from gateway.providers.chunks import (
    KEEPALIVE,
    Chunks,
    call_id,
    completion,
    error_object,
    include_usage,
    tool_call,
    usage,
)
from gateway.sse import Event, SSEParser

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.config import ProviderConfig

#: The API version sent when the provider's ``api_version`` is not set.
VERSION = "2023-06-01"
_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# "prompt is too long: 208310 tokens > 200000 maximum"; "input length and `max_tokens`
# exceed context limit: 188240 + 21333 > 200000"
_TOO_LONG = re.compile(r"prompt is too long|exceed context limit|context window")
_INPUT_COUNTS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


class AnthropicDialect:
    """Requests to ``{base_url}/messages``; the probe lists ``{base_url}/models``."""

    endpoints = frozenset({"chat/completions"})
    base_path = "/v1"  # what a configured base URL is made to end in
    judges_models = False  # aliases such as claude-sonnet-4-5 are not in the list
    running_url = None
    model_ids = staticmethod(openai_model_ids)  # {"data": [{"id": ...}]}, as OpenAI's

    def __init__(self, config: ProviderConfig, max_event_bytes: int) -> None:
        base = config.base_url  # ends in /v1
        self._url = f"{base}/messages"
        self.models_url = f"{base}/models?limit=1000"
        self._version = config.api_version or VERSION
        self._default_max = config.default_max_tokens
        self._max_event = max_event_bytes

    def headers(self, api_key: str | None) -> dict[str, str]:
        """``x-api-key`` and ``anthropic-version``; never the client's own key."""
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "anthropic-version": self._version,
        }
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    def request(self, call: Call, model: str) -> Outgoing:
        """The Messages API request for ``call``."""
        body = messages_request(call.body, model, self._default_max)
        translator = AnthropicTranslator(model, include_usage(call.body), self._max_event)
        return self._url, orjson.dumps(body), translator


# -- the request ------------------------------------------------------------------------


def messages_request(body: dict[str, Any], model: str, default_max: int) -> dict[str, Any]:
    """The Messages API body for an OpenAI chat completion request ``body``."""
    check_common(body, "Anthropic")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise Unsupported(f"response_format {fmt.get('type')!r} on Anthropic")
    modalities = body.get("modalities")
    if isinstance(modalities, list) and "audio" in modalities:
        raise Unsupported("audio output on Anthropic")
    system, messages = _messages(body["messages"])
    out: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens(body) or default_max,
    }
    if system:
        out["system"] = system
    if body.get("stream"):
        out["stream"] = True
    stop = stop_list(body)
    if stop:
        out["stop_sequences"] = stop
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequest(f"'{key}' must be a number")
        if key == "top_p" and "temperature" in out:
            continue  # Anthropic's recent models refuse both: the temperature wins
        out[key] = min(max(float(value), 0.0), 1.0)  # OpenAI's temperature goes to 2
    tools = body.get("tools")
    if tools:
        out["tools"] = _tools(tools)
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None and "tools" in out:
        out["tool_choice"] = choice
    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    return out


def _messages(items: list[Any]) -> tuple[str, list[dict[str, Any]]]:
    """(system prompt, alternating turns of content blocks) from OpenAI's messages."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(items):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where} must be an object")
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system.append(text_of(content, where))
        elif role == "user":
            _add(turns, "user", _user_blocks(content, where))
        elif role == "assistant":
            _add(turns, "assistant", _assistant_blocks(message, where))
        elif role == "tool":
            ident = message.get("tool_call_id")
            if not isinstance(ident, str):
                raise BadRequest(f"{where}.tool_call_id must be a string")
            result = {"type": "tool_result", "tool_use_id": ident}
            text = text_of(content, where)
            if text:
                result["content"] = text
            _add(turns, "user", [result])
        elif role == "function":
            raise Unsupported(f"{where}: legacy function messages on Anthropic")
        else:
            raise BadRequest(f"{where}.role {role!r} is not a chat role")
    return "\n\n".join(s for s in system if s), turns


def _add(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Append ``blocks`` as a ``role`` turn; Anthropic wants the roles to alternate."""
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or an array of parts")
    blocks = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise BadRequest(f"{at} must be an object")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest(f"{at}.text must be a string")
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url"), at))
        else:
            raise Unsupported(f"{at} of type {kind!r} on Anthropic")
    return blocks


def _image(image: Any, where: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else None
    if not isinstance(url, str):
        raise BadRequest(f"{where}.image_url.url must be a string")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise Unsupported(f"{where}: an image data URL that is not base64")
        media = header[5:].removesuffix(";base64")
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise BadRequest(f"{where}.image_url.url must be a data: or http(s) URL")


def _assistant_blocks(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    if message.get("function_call"):
        raise Unsupported(f"{where}: a legacy function_call on Anthropic")
    blocks: list[dict[str, Any]] = []
    text = text_of(message.get("content"), where)
    if text:
        blocks.append({"type": "text", "text": text})
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise BadRequest(f"{where}.tool_calls must be an array")
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(call.get("id"), str):
            raise BadRequest(f"{at} must have an id and a function")
        name, arguments = fn.get("name"), fn.get("arguments") or "{}"
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise BadRequest(f"{at}.function must have a name and arguments (a string)")
        try:
            parsed = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise BadRequest(f"{at}.function.arguments must be a JSON object")
        blocks.append({"type": "tool_use", "id": call["id"], "name": name, "input": parsed})
    return blocks


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise Unsupported(f"tools[{i}] of type {kind!r} on Anthropic")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequest(f"tools[{i}].function must have a name")
        schema = fn.get("parameters") or {"type": "object", "properties": {}}
        entry = {"name": fn["name"], "input_schema": schema}
        if isinstance(fn.get("description"), str):
            entry["description"] = fn["description"]
        out.append(entry)
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None:
        out = None
    elif choice in ("auto", "none"):
        out = {"type": choice}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not isinstance(name, str):
            raise BadRequest("tool_choice.function.name must be a string")
        out = {"type": "tool", "name": name}
    else:
        raise BadRequest("'tool_choice' must be none, auto, required or a function")
    if parallel is False:
        out = out or {"type": "auto"}
        if out["type"] != "none":
            out["disable_parallel_tool_use"] = True
    return out


# -- the answer -------------------------------------------------------------------------


def _code(kind: str, message: str) -> str | None:
    """The OpenAI error code under which the gateway's classifier knows an Anthropic error
    (the status does the rest: 529 and 500 are server errors, 401 and 403 auth)."""
    low = message.lower()
    if kind == "rate_limit_error":
        return "rate_limit_exceeded"
    if kind == "billing_error" or "credit balance" in low:
        return "insufficient_quota"
    if kind == "authentication_error":
        return "invalid_api_key"
    if kind == "not_found_error" and "model" in low:
        return "model_not_found"
    if kind == "invalid_request_error" and _TOO_LONG.search(low):
        return "context_length_exceeded"
    return None


def _error(err: Any) -> dict[str, Any] | None:
    """OpenAI's error object for Anthropic's ``{"type", "message"}``; None if not one."""
    if not isinstance(err, dict):
        return None
    kind = str(err.get("type") or "api_error")
    message = str(err.get("message") or kind)
    return error_object(message, kind, _code(kind, message))


def ratelimit_headers(headers: CIMultiDictProxy[str]) -> CIMultiDictProxy[str]:
    """``headers`` with Anthropic's request and token budgets also under OpenAI's
    ``x-ratelimit-*`` names, which the rate budgets and the retry hints read (its resets
    are RFC 3339 times; OpenAI's are durations)."""
    if (
        "anthropic-ratelimit-requests-remaining" not in headers
        and "anthropic-ratelimit-tokens-remaining" not in headers
    ):
        return headers
    out = CIMultiDict(headers)
    now = time.time()
    for kind in ("requests", "tokens"):
        for part in ("limit", "remaining"):
            value = headers.get(f"anthropic-ratelimit-{kind}-{part}")
            if value is not None:
                out[f"x-ratelimit-{part}-{kind}"] = value
        reset = _seconds_until(headers.get(f"anthropic-ratelimit-{kind}-reset"), now)
        if reset is not None:
            out[f"x-ratelimit-reset-{kind}"] = f"{reset:.3f}s"
    return CIMultiDictProxy(out)


def _seconds_until(stamp: str | None, now: float) -> float | None:
    if not stamp:
        return None
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - now)


class AnthropicTranslator(Chunks):
    """One Messages API answer, stream or not, in OpenAI's shapes."""

    __slots__ = ("_counts", "_parser", "_tools")

    def __init__(self, model: str, include_usage: bool, max_event_bytes: int) -> None:
        super().__init__(model, include_usage)
        self._parser = SSEParser(max_event_bytes)
        self._tools: dict[int, int] = {}  # content block index -> tool call index
        self._counts: dict[str, int] = {}

    def headers(self, headers: CIMultiDictProxy[str]) -> CIMultiDictProxy[str]:
        """Rate-limit headers under OpenAI's names too."""
        return ratelimit_headers(headers)

    def error(self, status: int, body: bytes) -> bytes:
        """``{"type": "error", "error": {"type", "message"}}`` in OpenAI's shape."""
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body  # a proxy's HTML page: classified from its status and words
        err = _error(parsed.get("error")) if isinstance(parsed, dict) else None
        return body if err is None else orjson.dumps(err)

    def answer(self, body: bytes) -> bytes:
        """A message as a ``chat.completion``."""
        try:
            msg = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body  # judged as a body that is not JSON
        if isinstance(msg, dict) and msg.get("type") == "error":
            return self.error(200, body)
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), list):
            raise BadAnswer("the answer is not an Anthropic message")
        texts, thinking, calls = [], [], []
        for block in msg["content"]:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "thinking" and isinstance(block.get("thinking"), str):
                thinking.append(block["thinking"])
            elif kind == "tool_use":
                arguments = orjson.dumps(block.get("input") or {}).decode()
                ident = block.get("id") if isinstance(block.get("id"), str) else call_id()
                calls.append(tool_call(None, ident, str(block.get("name") or ""), arguments))
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(texts) if texts or not calls else None,
            "refusal": None,
        }
        if calls:
            message["tool_calls"] = calls
        if thinking:
            message["reasoning_content"] = "".join(thinking)
        self._count(msg.get("usage"))
        ident = msg.get("id") if isinstance(msg.get("id"), str) else self.ident
        model = msg.get("model") if isinstance(msg.get("model"), str) else self.model
        return completion(ident, model, message, _finish(msg.get("stop_reason")), self.used)

    def feed(self, chunk: bytes, end: bool) -> bytes:
        """Anthropic's SSE events in, OpenAI's chunks out."""
        events = self._parser.feed(chunk) if chunk else self._parser.finish()
        return b"".join([self._event(e) for e in events])

    def _event(self, event: Event) -> bytes:
        if event.data is None:
            return b""
        try:
            obj = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            return self.unreadable()
        if not isinstance(obj, dict):
            return self.unreadable()
        kind = obj.get("type", event.name)
        if kind == "content_block_delta":
            return self._delta(obj)
        if kind == "content_block_start":
            return self._block(obj)
        if kind == "message_start":
            msg = obj.get("message")
            if isinstance(msg, dict):
                self._count(msg.get("usage"))
            return self.chunk({"content": ""})  # the role chunk
        if kind == "message_delta":
            self._count(obj.get("usage"))
            delta = obj.get("delta")
            reason = delta.get("stop_reason") if isinstance(delta, dict) else None
            return self.finish(_finish(reason)) if reason else b""
        if kind == "message_stop":
            return self.done()
        if kind == "ping":
            return KEEPALIVE
        if kind == "error":
            err = _error(obj.get("error")) or error_object("stream error", "api_error", None)
            return self.error_event(err)
        return b""  # content_block_stop, and event types added later

    def _block(self, obj: dict[str, Any]) -> bytes:
        block = obj.get("content_block")
        if not isinstance(block, dict):
            return b""
        kind = block.get("type")
        if kind == "tool_use":
            tool = len(self._tools)
            self._tools[_index(obj)] = tool
            ident = block.get("id") if isinstance(block.get("id"), str) else call_id()
            call = tool_call(tool, ident, str(block.get("name") or ""), "")
            return self.chunk({"tool_calls": [call]})
        if kind == "text" and isinstance(block.get("text"), str) and block["text"]:
            return self.chunk({"content": block["text"]})
        return b""

    def _delta(self, obj: dict[str, Any]) -> bytes:
        delta = obj.get("delta")
        if not isinstance(delta, dict):
            return b""
        kind = delta.get("type")
        if kind == "text_delta":
            field, value = "content", delta.get("text")
        elif kind == "input_json_delta":
            part = delta.get("partial_json")
            if not isinstance(part, str) or not part:
                return b""
            tool = self._tools.get(_index(obj), 0)
            return self.chunk({"tool_calls": [{"index": tool, "function": {"arguments": part}}]})
        elif kind == "thinking_delta":
            field, value = "reasoning_content", delta.get("thinking")
        else:
            return b""  # signature and citation deltas have no OpenAI field
        if not isinstance(value, str) or not value:
            return b""
        return self.chunk({field: value})

    def _count(self, counts: Any) -> None:
        """Keep the latest token counts (``message_delta``'s are cumulative)."""
        if not isinstance(counts, dict):
            return
        for key in (*_INPUT_COUNTS, "output_tokens"):
            value = token_count(counts.get(key))
            if value is not None:
                self._counts[key] = value
        c = self._counts
        prompt = sum(c.get(k, 0) for k in _INPUT_COUNTS) if "input_tokens" in c else None
        self.used = usage(prompt, c.get("output_tokens"), c.get("cache_read_input_tokens"))


def _index(obj: dict[str, Any]) -> int:
    index = obj.get("index")
    return index if type(index) is int else -1


def _finish(reason: Any) -> str:
    return _FINISH.get(reason, "stop") if isinstance(reason, str) else "stop"
