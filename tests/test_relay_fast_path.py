"""The fast path (``SSEParser.feed_lf`` and ``StreamState.take_blocks``) gives exactly the
verdict of the event-by-event path, from a stream's first byte (held before commit) or
after its commit (relayed).

Random streams built from every kind of event (plain chunks, finish and usage chunks, a
second choice, tool calls, keep-alives, named and multi-line events, malformed JSON,
error events, ``"error": null``, CRLF, ``[DONE]``), cut at random places, go through both
paths; the bytes passed to the client and the final state must be the same.
"""

from __future__ import annotations

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import Classified, Outcome
from gateway.sse import SSEError, SSEParser
from gateway.stream import StreamState, judge_read
from tests import fake_upstream as fu


def spaced(payload: dict) -> bytes:
    """The same chunk as Python's json.dumps writes it (llama-cpp-python): with spaces."""
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


EVENTS = [
    fu.chunk("Hello"),
    fu.chunk(" world"),
    fu.chunk("usage"),  # words that look like keys are only slower, never wrong
    fu.chunk(role=True),
    fu.chunk(finish="stop"),
    fu.chunk("x", indexes=(1,)),
    fu.chunk(finish="length", indexes=(1,)),
    fu.chunk("both", indexes=(0, 1)),
    fu.chunk(error_null=True),
    fu.chunk([{"index": 1, "function": {"arguments": "{}"}}], field="tool_calls"),
    fu.chunk(field="reasoning", content="hmm"),
    spaced({"choices": [{"index": 0, "delta": {"content": "sp"}, "finish_reason": None}]}),
    spaced({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n',
    b'data: {"choices":[{"delta":{"content":"no index"}}]}\n\n',
    b": keep-alive\n\n",
    b"event: ping\ndata: {}\n\n",
    b'data: {"choices":\ndata: [{"index":0,"delta":{"content":"2 lines"}}]}\n\n',
    b"data: {broken\n\n",
    b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n',
    b'event: error\ndata: {"message":"bad"}\n\n',
    b"\n",
    fu.chunk("crlf").replace(b"\n", b"\r\n"),
    b"data: [DONE]\n\n",
]


def run(stream: bytes, cuts: list[int], fast: bool, committed: bool) -> tuple:
    state = StreamState("p", "r")
    parser = SSEParser(1 << 20)
    out: list[bytes] = []
    if committed:
        state.take(parser.feed(fu.chunk("Hi")), out)  # as the relay starts
        assert state.output
    bounds = [0, *sorted(set(cuts)), len(stream)]
    pieces = [stream[lo:hi] for lo, hi in itertools.pairwise(bounds) if hi > lo]
    if fast:  # the gateway's own reader, as the hold and the relay call it
        for piece in [*pieces, b""]:
            if state.done or state.failure is not None:
                break
            judge_read(state, parser, None, piece, out)
    else:  # event by event
        try:
            for piece in pieces:
                if state.done or state.failure is not None:
                    break
                state.take(parser.feed(piece), out)
            else:
                state.take(parser.finish(), out)
                state.end(out)
        except SSEError as e:  # as the gateway does
            state.fail(Classified(Outcome.BAD_RESPONSE, str(e)))
    failure = state.failure
    return (
        b"".join(out),
        state.done,
        None if failure is None else (failure.outcome, failure.detail),
        sorted(state.finished),
        sorted(state.seen),
        state.usage,
        state.output,
    )


@settings(max_examples=800, deadline=None)
@given(
    picks=st.lists(st.sampled_from(range(len(EVENTS))), max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
    committed=st.booleans(),
)
def test_fast_path_matches_the_event_by_event_path(picks, cuts, committed):
    stream = b"".join(EVENTS[i] for i in picks)
    cuts = [c % (len(stream) + 1) for c in cuts]
    fast = run(stream, cuts, fast=True, committed=committed)
    assert fast == run(stream, cuts, fast=False, committed=committed)


def test_plain_chunks_pass_as_one_slice():
    stream = b"".join(fu.chunk(w) for w in fu.WORDS)
    state = StreamState("p", "r")
    parser = SSEParser()
    out: list[bytes] = []
    state.take(parser.feed(fu.chunk("Hi")), out)
    out.clear()
    framed = parser.feed_lf(stream)
    assert framed is not None
    state.take_blocks(*framed, out)
    assert out == [stream]  # forwarded as it came: one piece, no copy per event
