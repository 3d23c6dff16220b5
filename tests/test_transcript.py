"""The transcript of what a client has received, and the splice that checks a restart."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.transcript import Splice, Transcript

ORIGINAL = {"id": "chatcmpl-1", "model": "m1", "created": 1}
RESTART = {"id": "chatcmpl-2", "model": "m2", "created": 2}


def event(ident: dict[str, Any], *choices: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {**ident, "object": "chat.completion.chunk", "choices": list(choices), **more}


def text(index: int, content: str, finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": {"content": content}, "finish_reason": finish}


def sent(*events: dict[str, Any], limit: int = 1 << 20) -> Transcript:
    transcript = Transcript(limit)
    for obj in events:
        transcript.record(obj)
    return transcript


def feed(splice: Splice, *events: dict[str, Any]) -> list[dict[str, Any]]:
    """What the client gets of ``events``, decoded."""
    out = []
    for obj in events:
        data = splice.take(obj)
        if data:
            out += [orjson.loads(line[6:]) for line in data.split(b"\n\n") if line]
    return out


def test_a_restart_chunked_otherwise_is_verified_and_the_rest_passed_on_as_the_original():
    transcript = sent(
        event(ORIGINAL, {"index": 0, "delta": {"role": "assistant", "content": ""}}),
        event(ORIGINAL, text(0, "Hello")),
        event(ORIGINAL, text(0, " wor")),
    )
    splice = transcript.splice = Splice(transcript, verify=True)
    out = feed(
        splice,
        event(RESTART, {"index": 0, "delta": {"role": "assistant", "content": ""}}),
        event(RESTART, text(0, "Hello w")),
        event(RESTART, text(0, "orld, again")),
        event(RESTART, text(0, "!", "stop")),
    )
    assert splice.verified and not splice.diverged
    assert [o["choices"][0]["delta"].get("content") for o in out] == ["ld, again", "!"]
    assert all({k: o[k] for k in ORIGINAL} == ORIGINAL for o in out)
    assert out[-1]["choices"][0]["finish_reason"] == "stop"
    assert transcript.sent() == {0: {"content": "Hello world, again!"}}  # for a second rescue


def test_a_choice_that_goes_on_first_is_held_until_every_choice_caught_up():
    transcript = sent(event(ORIGINAL, text(0, "ab"), text(1, "xy")))
    splice = Splice(transcript, verify=True)
    assert feed(splice, event(RESTART, text(0, "abc"))) == []  # choice 1 still to come
    out = feed(splice, event(RESTART, text(1, "xyz")))
    assert [(c["index"], c["delta"]["content"]) for o in out for c in o["choices"]] == [
        (0, "c"),
        (1, "z"),
    ]


def test_any_difference_diverges_and_nothing_more_is_passed_on():
    transcript = sent(event(ORIGINAL, text(0, "Hello world")))
    splice = Splice(transcript, verify=True)
    assert feed(splice, event(RESTART, text(0, "Hello")), event(RESTART, text(0, " there"))) == []
    assert "differs after 5 characters of content" in splice.diverged
    assert feed(splice, event(RESTART, text(0, " and more"))) == []


def test_finishing_before_the_text_sent_diverges():
    transcript = sent(event(ORIGINAL, text(0, "Hello world")))
    splice = Splice(transcript, verify=True)
    feed(splice, event(RESTART, text(0, "Hello", "stop")))
    assert "finished before" in splice.diverged


def tool(index: int, arguments: str, **first: Any) -> dict[str, Any]:
    call = {"index": index, **first, "function": {"arguments": arguments}}
    if first:
        call["function"]["name"] = "get_weather"
    return {"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}


def test_tool_calls_keep_the_ids_the_client_has_and_a_new_call_gets_its_own():
    transcript = sent(event(ORIGINAL, tool(0, '{"city": ', id="call_a", type="function")))
    splice = Splice(transcript, verify=True)
    out = feed(
        splice,
        event(RESTART, tool(0, '{"city": "Par', id="call_b", type="function")),
        event(RESTART, tool(0, 'is"}')),
        event(RESTART, tool(1, "{}", id="call_c", type="function")),
    )
    calls = [t for o in out for t in o["choices"][0]["delta"]["tool_calls"]]
    assert [t["function"].get("arguments") for t in calls] == ['"Par', 'is"}', "{}"]
    assert [t.get("id") for t in calls] == [None, None, "call_c"]
    assert "get_weather" not in orjson.dumps(calls[:2]).decode()  # the name was sent


def test_output_that_is_not_text_cannot_be_rescued():
    audio = {"index": 0, "delta": {"audio": {"id": "a1"}}, "finish_reason": None}
    transcript = sent(event(ORIGINAL, text(0, "Hi")), event(ORIGINAL, audio))
    assert "audio" in transcript.broken and transcript.sent() == {}
    splice = Splice(sent(event(ORIGINAL, text(0, "Hi"))), verify=True)
    feed(splice, event(RESTART, audio))
    assert "audio" in splice.diverged


def test_the_text_kept_is_bounded():
    transcript = sent(*(event(ORIGINAL, text(0, "x" * 100)) for _ in range(11)), limit=1024)
    assert "max_prefix_bytes" in transcript.broken and transcript.sent() == {}


def test_a_prefill_continuation_passes_at_once_without_a_second_role():
    transcript = sent(event(ORIGINAL, {"index": 0, "delta": {"role": "assistant"}}, text(0, "Hi")))
    splice = Splice(transcript, verify=False)
    out = feed(
        splice,
        event(RESTART, {"index": 0, "delta": {"role": "assistant", "content": ""}}),
        event(RESTART, text(0, " there")),
    )
    assert [o["choices"][0]["delta"] for o in out] == [{"content": ""}, {"content": " there"}]
    assert {o["id"] for o in out} == {ORIGINAL["id"]}
