"""What the client has received of a stream, per choice, and the splice that checks a
restarted stream against it.

A stream whose request asked for a rescue (``gateway.rescue``) keeps a
:class:`Transcript`: the stream state feeds it every event that goes to the client, and it
keeps the text of each choice (``content`` and the other text fields, tool-call names and
arguments) and the original stream's ``id``, ``model`` and ``created``. Nothing else is
kept, and only up to ``max_prefix_bytes``: past that, or once an event carries output
that cannot be compared as text (``audio``, fields not invented yet), the stream can no
longer be rescued and the transcript forgets what it had.

When a restarted stream takes over, a :class:`Splice` stands between it and the client.
Until every choice has reproduced exactly what the client already has, it shows the
client nothing: each piece of text is compared with what was sent, and the first
difference (a different word, a choice that goes on or finishes before it reproduced its
part, another field) makes it *diverge*. Once everything is reproduced it lets the rest
through, with the original stream's ``id``, ``model`` and ``created`` and the tool-call
ids the client already has, and the transcript records it as before (a second rescue
compares against all of it). A prefill continuation (the provider continues the partial
answer itself) has nothing to reproduce: its splice lets the output through at once.
"""

from __future__ import annotations

from io import StringIO
from typing import Any

import orjson

from gateway.sse import encode_data

#: What a piece of text is: a delta field (``content``, ``refusal``, ``reasoning_content``,
#: legacy ``text``...) or a part of a tool call: (``tool_calls``, tool index, ``name`` or
#: ``arguments``), (``function_call``, 0, part).
Key = str | tuple[str, int, str]
_IDENT = ("id", "model", "created")


class _Uncomparable(Exception):
    """An event carries output that is not text."""


class _Diverged(Exception):
    """A restarted stream says something else than what the client has."""


def _index(choice: dict[str, Any]) -> int:
    index = choice.get("index", 0)
    return index if type(index) is int else 0


def _name(key: Key) -> str:
    """``content``, ``tool_calls[0].arguments``."""
    return key if isinstance(key, str) else f"{key[0]}[{key[1]}].{key[2]}"


def _size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def _pieces(choice: dict[str, Any]) -> list[tuple[Key, str]]:
    """The text one streamed choice adds, in order; raises :class:`_Uncomparable` for
    output that is not text."""
    out: list[tuple[Key, str]] = []
    text = choice.get("text")  # legacy completions
    if type(text) is str and text:
        out.append(("text", text))
    delta = choice.get("delta")
    if type(delta) is not dict:
        return out
    for key, value in delta.items():
        if key == "role" or value is None or value in ("", [], {}):
            continue
        if type(value) is str:
            out.append((key, value))
        elif key == "tool_calls" and type(value) is list:
            for call in value:
                if type(call) is not dict or type(call.get("index", 0)) is not int:
                    raise _Uncomparable(key)
                _parts(out, key, call.get("index", 0), call.get("function"))
        elif key == "function_call":
            _parts(out, key, 0, value)
        else:
            raise _Uncomparable(key)
    return out


def _parts(out: list[tuple[Key, str]], key: str, index: int, function: Any) -> None:
    """A function's ``name`` and ``arguments`` pieces."""
    if function is None:
        return
    if type(function) is not dict:
        raise _Uncomparable(key)
    for part in ("name", "arguments"):
        piece = function.get(part)
        if piece is None or piece == "":
            continue
        if type(piece) is not str:
            raise _Uncomparable(key)
        out.append(((key, index, part), piece))


class Transcript:
    """The text of each choice that the client has received, up to ``limit`` bytes."""

    __slots__ = ("broken", "choices", "ident", "limit", "size", "splice", "texts", "tool_ids")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # Each text in a StringIO: about a byte a character, where a list of the pieces
        # would cost some fifty bytes of object for every few characters.
        self.texts: dict[int, dict[Key, StringIO]] = {}
        self.choices: set[int] = set()  # choice indexes the client has seen (its role)
        self.tool_ids: dict[tuple[int, int], Any] = {}  # (choice, tool index) -> id sent
        self.ident: dict[str, Any] = {}  # the original stream's id, model and created
        self.size = 0
        self.broken = ""  # why the stream can no longer be rescued ("" while it can)
        self.splice: Splice | None = None  # a restarted stream being checked or passed on

    def take(self, obj: dict[str, Any]) -> bytes | None:
        """An event for the client: None when its bytes go as they came (recorded here),
        else what goes instead (``b""``: nothing)."""
        splice = self.splice
        if splice is None:
            self.record(obj)
            return None
        return splice.take(obj)

    def record(self, obj: dict[str, Any]) -> None:
        """Note what ``obj`` (an event the client gets) adds to each choice."""
        if self.broken:
            return
        if not self.ident:
            self.ident = {k: obj[k] for k in _IDENT if k in obj}
        choices = obj.get("choices")
        if type(choices) is not list:
            return
        try:
            for choice in choices:
                if type(choice) is not dict:
                    continue
                index = _index(choice)
                self.choices.add(index)
                pieces = _pieces(choice)
                self._tool_ids(index, choice)
                if not pieces:
                    continue
                texts = self.texts.setdefault(index, {})
                for key, piece in pieces:
                    text = texts.get(key)
                    if text is None:
                        text = texts[key] = StringIO()
                    text.write(piece)
                    self.size += _size(piece)
        except _Uncomparable as e:
            self._break(f"its output has {e} that cannot be compared as text")
            return
        if self.size > self.limit:
            self._break(f"the text sent is longer than max_prefix_bytes ({self.limit})")

    def sent(self) -> dict[int, dict[Key, str]]:
        """Each choice's texts, as the client has them."""
        return {
            index: {key: text.getvalue() for key, text in texts.items()}
            for index, texts in self.texts.items()
        }

    def _tool_ids(self, index: int, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        calls = delta.get("tool_calls") if type(delta) is dict else None
        if type(calls) is list:
            for call in calls:
                if "id" in call:
                    self.tool_ids.setdefault((index, call.get("index", 0)), call["id"])

    def _break(self, why: str) -> None:
        self.broken = why
        self.texts.clear()
        self.tool_ids.clear()


class Splice:
    """A restarted stream against ``transcript``: compared until it has reproduced every
    choice's text (``verify``), then passed on as the original stream's continuation."""

    __slots__ = ("diverged", "got", "held", "left", "need", "pending", "transcript", "verified")

    def __init__(self, transcript: Transcript, verify: bool) -> None:
        self.transcript = transcript
        self.need = transcript.sent() if verify else {}
        self.left = {index: len(texts) for index, texts in self.need.items()}  # keys to go
        self.got: dict[tuple[int, Key], int] = {}  # characters of each text reproduced
        self.pending: list[dict[str, Any]] = []  # new text held until everything matched
        self.held = 0
        self.verified = not any(self.left.values())
        self.diverged = ""  # why the restarted stream is not the same answer

    def take(self, obj: dict[str, Any]) -> bytes:
        """What the client gets of ``obj``: nothing until the text sent is reproduced."""
        if self.diverged:
            return b""
        if self.verified:
            return self._forward(obj)
        try:
            rest = self._compare(obj)
        except _Diverged as e:
            self.diverged = str(e)
            self.pending.clear()
            return b""
        if rest is not None:
            self.pending.append(rest)
        if any(self.left.values()):
            return b""
        self.verified = True
        out = b"".join([self._forward(o) for o in self.pending])
        self.pending.clear()
        return out

    def _compare(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """``obj`` less the text the client already has; raises :class:`_Diverged`."""
        choices = obj.get("choices")
        kept = []
        for choice in choices if type(choices) is list else ():
            if type(choice) is not dict:
                continue
            index = _index(choice)
            try:
                pieces = _pieces(choice)
            except _Uncomparable as e:
                raise _Diverged(f"choice {index} has {e}, which was not sent") from None
            need = self.need.get(index, {})
            rest: list[tuple[Key, str]] = []
            whole = True  # no text of this choice was cut off
            for key, piece in pieces:
                sent = need.get(key, "")
                pos = self.got.get((index, key), 0)
                self.got[index, key] = pos + len(piece)
                if pos < len(sent):
                    n = min(len(piece), len(sent) - pos)
                    if piece[:n] != sent[pos : pos + n]:
                        where = f"{pos} characters of {_name(key)}"
                        raise _Diverged(f"choice {index} differs after {where}")
                    if pos + n == len(sent):
                        self.left[index] -= 1
                    piece = piece[n:]
                    whole = False
                if piece:
                    rest.append((key, piece))
            to_go = self.left.get(index, 0)
            if rest and to_go:
                raise _Diverged(f"choice {index} went on before it reproduced the text sent")
            finish = choice.get("finish_reason")
            if finish and to_go:
                raise _Diverged(f"choice {index} finished before it reproduced the text sent")
            if rest or finish:
                kept.append(self._trimmed(index, choice, rest, whole))
                self.held += sum(_size(piece) for _, piece in rest)
                if self.held > self.transcript.limit:
                    raise _Diverged("more new text than max_prefix_bytes before the rest matched")
        usage = obj.get("usage")
        if kept or (type(usage) is dict and usage):
            return {**obj, "choices": kept}
        return None

    def _trimmed(
        self, index: int, choice: dict[str, Any], rest: list[tuple[Key, str]], whole: bool
    ) -> dict[str, Any]:
        """``choice`` with only the text in ``rest`` (``whole``: nothing was cut)."""
        if whole:
            return choice
        new = {k: v for k, v in choice.items() if k not in ("delta", "text", "logprobs")}
        if "logprobs" in choice:
            new["logprobs"] = None  # those of the text cut off would repeat
        delta: dict[str, Any] = {}
        calls: dict[int, dict[str, Any]] = {}
        for key, piece in rest:
            if key == "text":
                new["text"] = piece
            elif isinstance(key, str):
                delta[key] = piece
            elif key[0] == "function_call":
                delta.setdefault("function_call", {})[key[2]] = piece
            else:
                call = calls.setdefault(key[1], {"index": key[1], "function": {}})
                call["function"][key[2]] = piece
        if calls:
            delta["tool_calls"] = [self._tool_call(index, choice, call) for call in calls.values()]
        if "delta" in choice:
            new["delta"] = delta
        return new

    def _tool_call(self, index: int, choice: dict[str, Any], call: dict[str, Any]) -> Any:
        """A tool call's remaining text, with its id and type when the client has none."""
        tool = call["index"]
        if (index, tool) not in self.transcript.tool_ids:
            for original in choice["delta"].get("tool_calls", ()):
                if original.get("index", 0) == tool:
                    for k in ("id", "type"):
                        if k in original:
                            call[k] = original[k]
        return call

    def _forward(self, obj: dict[str, Any]) -> bytes:
        """``obj`` as the original stream's continuation, recorded in the transcript."""
        transcript = self.transcript
        for k, v in transcript.ident.items():
            if k in obj:
                obj[k] = v
        choices = obj.get("choices")
        for choice in choices if type(choices) is list else ():
            delta = choice.get("delta") if type(choice) is dict else None
            if type(delta) is not dict:
                continue
            index = _index(choice)
            if index in transcript.choices:
                delta.pop("role", None)  # the client has had it
            calls = delta.get("tool_calls")
            for call in calls if type(calls) is list else ():
                sent = transcript.tool_ids.get((index, call.get("index", 0)))
                if sent is not None and "id" in call:
                    call["id"] = sent
        transcript.record(obj)
        return encode_data(orjson.dumps(obj))
