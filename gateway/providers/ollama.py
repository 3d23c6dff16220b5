"""Ollama's native API (``POST /api/chat``, NDJSON streams) behind the OpenAI API: for
servers whose ``/v1`` is off or old, and for Ollama's own ``done_reason``,
``prompt_eval_count`` and ``eval_count``.

The request: messages keep their roles (developer becomes system; text parts are joined;
images, which must be data URLs, go to ``images`` as base64; an assistant's
``tool_calls`` carry their arguments as objects; a tool message its ``tool_name``),
``tools`` pass as they are, ``response_format`` becomes ``format`` (``"json"`` or the
schema), and ``temperature``, ``top_p``, ``seed``, ``stop``, ``presence_penalty``,
``frequency_penalty`` and the output cap (``num_predict``) go to ``options``. ``n > 1``,
``logprobs``, image URLs and other content parts are ``unsupported``; ``tool_choice`` and
the rest are dropped.

The answer: each NDJSON line becomes a chunk (``message.content`` content,
``message.thinking`` ``reasoning_content``, ``message.tool_calls`` tool-call deltas), the
``done`` line the ``finish_reason`` (``done_reason``; ``tool_calls`` when the model called
one) with the usage, then ``[DONE]``; an ``{"error": ...}`` line an error event. The
probe lists ``/api/tags`` (the models Ollama can serve) and ``/api/ps`` (those in memory).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from gateway.providers.base import (
    BadAnswer,
    BadRequest,
    Outgoing,
    Unsupported,
    api_root,
    check_common,
    max_tokens,
    stop_list,
    text_of,
)
from gateway.providers.chunks import (
    Chunks,
    Lines,
    call_id,
    completion,
    error_object,
    include_usage,
    tool_call,
    usage,
)
from gateway.providers.openai import OpenAIDialect

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.config import ProviderConfig

_OPTIONS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
_FINISH = {"stop": "stop", "length": "length"}


class OllamaDialect:
    """Requests to ``{root}/api/chat``; the probe lists ``/api/tags`` and ``/api/ps``."""

    endpoints = frozenset({"chat/completions"})
    base_path = ""  # what a configured base URL is made to end in
    judges_models = True  # /api/tags lists every model Ollama can load

    def __init__(self, config: ProviderConfig, max_event_bytes: int) -> None:
        root = api_root(config.base_url)
        self._url = f"{root}/api/chat"
        self.models_url = f"{root}/api/tags"
        self.running_url: str | None = f"{root}/api/ps"
        self._max_event = max_event_bytes

    # OpenAI's: JSON both ways, and a key (for an Ollama behind a proxy) as a bearer token.
    headers = OpenAIDialect.headers

    @staticmethod
    def model_ids(body: bytes) -> frozenset[str] | None:
        """``{"models": [{"name": "llama3.2:latest", "model": ...}]}`` (tags and ps)."""
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        models = parsed.get("models") if isinstance(parsed, dict) else None
        if not isinstance(models, list):
            return None
        names = set()
        for m in models:
            if isinstance(m, dict):
                names.update(str(m[k]) for k in ("name", "model") if isinstance(m.get(k), str))
        return frozenset(names)

    def request(self, call: Call, model: str) -> Outgoing:
        """The ``/api/chat`` request for ``call``."""
        body = chat_request(call.body, model)
        translator = OllamaTranslator(model, include_usage(call.body), self._max_event)
        return self._url, orjson.dumps(body), translator


def chat_request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """The ``/api/chat`` body for an OpenAI chat completion request ``body``."""
    check_common(body, "Ollama")
    out: dict[str, Any] = {
        "model": model,
        "messages": _messages(body["messages"]),
        "stream": bool(body.get("stream")),  # Ollama streams unless told not to
    }
    options: dict[str, Any] = {}
    for key in _OPTIONS:
        value = body.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise BadRequest(f"'{key}' must be a number")
            options[key] = value
    cap = max_tokens(body)
    if cap is not None:
        options["num_predict"] = cap
    stop = stop_list(body)
    if stop:
        options["stop"] = stop
    if options:
        out["options"] = options
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise BadRequest("'tools' must be an array")
        out["tools"] = tools  # Ollama takes OpenAI's function tools as they are
    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        kind = fmt.get("type")
        if kind == "json_object":
            out["format"] = "json"
        elif kind == "json_schema":
            schema = fmt.get("json_schema")
            if not isinstance(schema, dict) or not isinstance(schema.get("schema"), dict):
                raise BadRequest("response_format.json_schema.schema must be an object")
            out["format"] = schema["schema"]
    return out


def _messages(items: list[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name, for tool messages
    for i, message in enumerate(items):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where} must be an object")
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            out.append({"role": "system", "content": text_of(content, where)})
        elif role == "user":
            out.append(_user(content, where))
        elif role == "assistant":
            out.append(_assistant(message, where, names))
        elif role == "tool":
            entry = {"role": "tool", "content": text_of(content, where)}
            name = names.get(message.get("tool_call_id") or "")
            if name:
                entry["tool_name"] = name
            out.append(entry)
        elif role == "function":
            raise Unsupported(f"{where}: legacy function messages on Ollama")
        else:
            raise BadRequest(f"{where}.role {role!r} is not a chat role")
    return out


def _user(content: Any, where: str) -> dict[str, Any]:
    if not isinstance(content, list):
        return {"role": "user", "content": text_of(content, where)}
    texts: list[str] = []
    images: list[str] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise BadRequest(f"{at} must be an object")
        if part.get("type") == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str):
                raise BadRequest(f"{at}.image_url.url must be a string")
            header, _, data = url.partition(",")
            if not (header.startswith("data:") and header.endswith(";base64")):
                raise Unsupported(f"{at}: Ollama takes images inline (base64 data URLs)")
            images.append(data)
        elif part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise Unsupported(f"{at} of type {part.get('type')!r} on Ollama")
    entry: dict[str, Any] = {"role": "user", "content": "".join(texts)}
    if images:
        entry["images"] = images
    return entry


def _assistant(message: dict[str, Any], where: str, names: dict[str, str]) -> dict[str, Any]:
    if message.get("function_call"):
        raise Unsupported(f"{where}: a legacy function_call on Ollama")
    entry: dict[str, Any] = {"role": "assistant", "content": text_of(message.get("content"), where)}
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise BadRequest(f"{where}.tool_calls must be an array")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequest(f"{at}.function must have a name")
        try:
            arguments = orjson.loads(fn.get("arguments") or "{}")
        except (orjson.JSONDecodeError, TypeError):
            arguments = None
        if not isinstance(arguments, dict):
            raise BadRequest(f"{at}.function.arguments must be a JSON object")
        if isinstance(call.get("id"), str):
            names[call["id"]] = fn["name"]
        out.append({"function": {"name": fn["name"], "arguments": arguments}})
    if out:
        entry["tool_calls"] = out
    return entry


def _error(message: Any, status: int) -> dict[str, Any]:
    """OpenAI's error object for Ollama's ``{"error": "message"}``."""
    text = str(message)
    low = text.lower()
    code = None
    if "model" in low and ("not found" in low or status == 404):
        code = "model_not_found"
    elif "context length" in low or "context window" in low:
        code = "context_length_exceeded"
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return error_object(text, kind, code)


class OllamaTranslator(Chunks):
    """One ``/api/chat`` answer, NDJSON stream or not, in OpenAI's shapes."""

    __slots__ = ("_lines", "_tools")

    stream_type = "application/x-ndjson"

    def __init__(self, model: str, include_usage: bool, max_event_bytes: int) -> None:
        super().__init__(model, include_usage)
        self._lines = Lines(max_event_bytes)
        self._tools = 0  # tool calls sent so far

    def error(self, status: int, body: bytes) -> bytes:
        """``{"error": "message"}`` in OpenAI's shape."""
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body
        if not isinstance(parsed, dict) or parsed.get("error") is None:
            return body
        return orjson.dumps(_error(parsed["error"], status))

    def answer(self, body: bytes) -> bytes:
        """A ``done`` answer as a ``chat.completion``."""
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body
        if isinstance(obj, dict) and obj.get("error") is not None:
            return orjson.dumps(_error(obj["error"], 200))
        msg = obj.get("message") if isinstance(obj, dict) else None
        if not isinstance(msg, dict):
            raise BadAnswer("the answer is not an Ollama chat response")
        calls = [
            tool_call(None, ident, name, arguments)
            for ident, name, arguments in _calls(msg.get("tool_calls"))
        ]
        content = msg.get("content") if isinstance(msg.get("content"), str) else ""
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content if content or not calls else None,
            "refusal": None,
        }
        if calls:
            message["tool_calls"] = calls
        if isinstance(msg.get("thinking"), str) and msg["thinking"]:
            message["reasoning_content"] = msg["thinking"]
        finish = _finish(obj, bool(calls))
        used = usage(obj.get("prompt_eval_count"), obj.get("eval_count"))
        return completion(self.ident, _model(obj, self.model), message, finish, used)

    def feed(self, chunk: bytes, end: bool) -> bytes:
        """NDJSON lines in, OpenAI's chunks out."""
        lines = self._lines.feed(chunk) if chunk else self._lines.finish()
        return b"".join([self._line(line) for line in lines])

    def _line(self, line: bytes) -> bytes:
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            return self.unreadable()
        if not isinstance(obj, dict):
            return self.unreadable()
        if obj.get("error") is not None:
            return self.error_event(_error(obj["error"], 200))
        self.model = _model(obj, self.model)
        out = []
        msg = obj.get("message")
        if isinstance(msg, dict):
            thinking = msg.get("thinking")
            if isinstance(thinking, str) and thinking:
                out.append(self.chunk({"reasoning_content": thinking}))
            content = msg.get("content")
            if isinstance(content, str) and (content or not self.started):
                out.append(self.chunk({"content": content}))
            for ident, name, arguments in _calls(msg.get("tool_calls")):
                call = tool_call(self._tools, ident, name, arguments)
                self._tools += 1
                out.append(self.chunk({"tool_calls": [call]}))
        if obj.get("done") is True:
            self.used = usage(obj.get("prompt_eval_count"), obj.get("eval_count"))
            out.append(self.finish(_finish(obj, self._tools > 0)))
            out.append(self.done())
        return b"".join(out)


def _calls(calls: Any) -> list[tuple[str, str, str]]:
    """(id, name, arguments as JSON text) of Ollama's tool calls (arguments are objects)."""
    out = []
    for call in calls if isinstance(calls, list) else ():
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        ident = call.get("id") if isinstance(call.get("id"), str) else call_id()
        arguments = fn.get("arguments")
        text = arguments if isinstance(arguments, str) else orjson.dumps(arguments or {}).decode()
        out.append((ident, str(fn.get("name") or ""), text))
    return out


def _finish(obj: dict[str, Any], called: bool) -> str:
    """OpenAI's ``finish_reason``: ``tool_calls`` when the model called a tool, else from
    ``done_reason`` (``stop``, ``length``; ``load`` and others read as ``stop``)."""
    return "tool_calls" if called else _FINISH.get(str(obj.get("done_reason")), "stop")


def _model(obj: dict[str, Any], default: str) -> str:
    model = obj.get("model")
    return model if isinstance(model, str) and model else default
