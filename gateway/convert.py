"""A complete answer as a stream, and a stream as a complete answer (OpenAI's shapes).

The cache stores an answer in the form it was produced. A request that wants the other
form gets it converted here: a ``chat.completion`` becomes ``chat.completion.chunk``
events (per choice, one delta with the whole message, then its ``finish_reason``; the
usage chunk when the request set ``stream_options.include_usage``; ``[DONE]``), and a
stream's chunks are folded back into one ``chat.completion`` (text fields concatenated,
tool calls merged by their ``index``). Legacy ``text_completion`` answers go both ways
too. The stored ``id``, ``created``, ``model`` and ``system_fingerprint`` are kept.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.sse import DONE, DONE_EVENT, SSEError, SSEParser, encode_data

# Fields copied from an answer to each of its chunks and back, in OpenAI's order.
_HEAD = ("id", "object", "created", "model", "system_fingerprint", "service_tier")
# Delta fields that name or identify something: a later chunk replaces them, never extends.
_REPLACED = frozenset({"id", "type", "role", "index", "expires_at"})


class ConvertError(ValueError):
    """The stored answer is not in the shape the conversion needs."""


def _head(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    head = {k: obj[k] for k in _HEAD if k in obj}
    head["object"] = kind
    return head


def _event(head: dict[str, Any], choices: list[dict[str, Any]], **extra: Any) -> bytes:
    return encode_data(orjson.dumps({**head, "choices": choices, **extra}))


def answer_to_stream(body: bytes, endpoint: str, include_usage: bool) -> bytes:
    """The SSE body of a stream that says what the complete answer ``body`` says."""
    obj = _object(body)
    choices = obj.get("choices")
    if not isinstance(choices, list):
        raise ConvertError("the answer has no choices")
    legacy = endpoint == "completions"
    head = _head(obj, "text_completion" if legacy else "chat.completion.chunk")
    out: list[bytes] = []
    for choice in choices:
        if not isinstance(choice, dict):
            raise ConvertError("a choice is not an object")
        index = choice.get("index", 0)
        logprobs = choice.get("logprobs")
        finish = choice.get("finish_reason")
        if legacy:
            text = choice.get("text") or ""
            piece = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            out.append(_event(head, [piece]))
            continue
        message = choice.get("message")
        if not isinstance(message, dict):
            raise ConvertError("a choice has no message")
        delta: dict[str, Any] = {"role": message.get("role") or "assistant"}
        for key, value in message.items():
            if key == "role" or value is None:
                continue
            if key == "tool_calls" and isinstance(value, list):  # deltas number their calls
                value = [{"index": n, **c} for n, c in enumerate(value) if isinstance(c, dict)]
            delta[key] = value
        said = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}
        out.append(_event(head, [said]))
        end = {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}
        out.append(_event(head, [end]))
    usage = obj.get("usage")
    if include_usage and usage is not None:
        out.append(_event(head, [], usage=usage))
    out.append(DONE_EVENT)
    return b"".join(out)


def stream_to_answer(data: bytes, endpoint: str) -> bytes:
    """The complete answer (JSON) that the SSE body ``data`` streamed."""
    return orjson.dumps(fold_stream(data, endpoint))


def fold_stream(data: bytes, endpoint: str) -> dict[str, Any]:
    """Fold a stream's chunks into the complete answer they spell."""
    parser = SSEParser(len(data) + 1)  # the whole body is here: no event can exceed it
    try:
        events = parser.feed(data, final=True)
    except SSEError as e:
        raise ConvertError(str(e)) from None
    legacy = endpoint == "completions"
    first: dict[str, Any] | None = None
    usage: Any = None
    choices: dict[int, dict[str, Any]] = {}
    for event in events:
        if event.data is None or event.data == DONE:
            continue
        obj = _object(event.data)
        if first is None:
            first = obj
        if obj.get("usage") is not None:
            usage = obj["usage"]
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict) or not isinstance(choice.get("index", 0), int):
                raise ConvertError("a chunk's choice is not an object with an index")
            _fold_choice(choices, choice, legacy)
    if first is None:
        raise ConvertError("the stream has no chunk")
    answer = _head(first, "text_completion" if legacy else "chat.completion")
    answer["choices"] = [choices[i] for i in sorted(choices)]
    _strip_call_indexes(answer["choices"])
    if usage is not None:
        answer["usage"] = usage
    return answer


def _fold_choice(choices: dict[int, dict[str, Any]], choice: dict[str, Any], legacy: bool) -> None:
    index = choice.get("index", 0)
    into = choices.get(index)
    if into is None:
        into = {"index": index}
        if legacy:
            into["text"] = ""
        else:
            into["message"] = {"role": "assistant", "content": None}
        into["logprobs"] = None
        into["finish_reason"] = None
        choices[index] = into
    if legacy:
        into["text"] += choice.get("text") or ""
    else:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            _merge(into["message"], delta)
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict):
        if into["logprobs"] is None:
            into["logprobs"] = {}
        _merge(into["logprobs"], logprobs)
    if choice.get("finish_reason"):
        into["finish_reason"] = choice["finish_reason"]


def _merge(into: dict[str, Any], delta: dict[str, Any]) -> None:
    """Add one delta to what came before: text is concatenated, objects merged, tool calls
    merged by their ``index``, other lists extended; names and ids replace."""
    for key, value in delta.items():
        if value is None:
            continue
        have = into.get(key)
        if key == "tool_calls" and isinstance(value, list):
            calls = have if isinstance(have, list) else []
            into[key] = calls
            for part in value:
                if isinstance(part, dict):
                    _merge_call(calls, part)
        elif isinstance(value, str) and isinstance(have, str) and key not in _REPLACED:
            into[key] = have + value
        elif isinstance(value, dict) and isinstance(have, dict):
            _merge(have, value)
        elif isinstance(value, list) and isinstance(have, list):
            have.extend(value)
        elif isinstance(value, dict):
            into[key] = {}
            _merge(into[key], value)
        elif isinstance(value, list):
            into[key] = list(value)
        else:
            into[key] = value


def _merge_call(calls: list[dict[str, Any]], part: dict[str, Any]) -> None:
    index = part.get("index", len(calls))
    for call in calls:
        if call.get("index") == index:
            break
    else:
        call = {"index": index}
        calls.append(call)
    _merge(call, part)


def _strip_call_indexes(choices: list[dict[str, Any]]) -> None:
    """Tool calls in a complete answer carry no ``index`` (deltas do)."""
    for choice in choices:
        message = choice.get("message")
        if isinstance(message, dict) and isinstance(message.get("tool_calls"), list):
            for call in message["tool_calls"]:
                if isinstance(call, dict):
                    call.pop("index", None)


def _object(data: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ConvertError("not JSON") from None
    if not isinstance(obj, dict):
        raise ConvertError("not a JSON object")
    return obj
