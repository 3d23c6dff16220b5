"""What each dialect costs in the gateway's own CPU, without a network (not timed by CI).

For every dialect: building one attempt's request from a client's chat request, turning a
complete answer into what the client gets, and one streamed event from the upstream's
bytes to the stream state's verdict (translator, SSE framing, judging), as the relay does
after commit: reads of 4 events at a time. The OpenAI dialect's translator is the
identity, so its numbers are those of the path every OpenAI-compatible stream takes.

    python -m bench.dialects            # about 10 s
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.call import Call
from gateway.config import ProviderConfig
from gateway.providers import DIALECTS
from gateway.sse import SSEParser
from gateway.stream import StreamState

WORDS = ["Hello", " from", " the", " fake", " upstream", "."]
TEXT = "".join(WORDS)
BODY: dict[str, Any] = {
    "model": "gpt-bench",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Say hello in one short sentence."},
    ],
    "temperature": 0.7,
    "max_tokens": 64,
}
HEADERS = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))
EVENTS = 400  # content events in the measured stream


def _anthropic_stream(n: int) -> tuple[bytes, list[bytes]]:
    def event(kind: str, **data: Any) -> bytes:
        return f"event: {kind}\ndata: ".encode() + orjson.dumps({"type": kind, **data}) + b"\n\n"

    start = event("message_start", message={"id": "m", "usage": {"input_tokens": 9}})
    start += event("content_block_start", index=0, content_block={"type": "text", "text": ""})
    return start, [
        event("content_block_delta", index=0, delta={"type": "text_delta", "text": WORDS[i % 6]})
        for i in range(n)
    ]


def _ollama_stream(n: int) -> tuple[bytes, list[bytes]]:
    def line(i: int) -> bytes:
        message = {"role": "assistant", "content": WORDS[i % 6]}
        created = "2025-01-01T00:00:00Z"
        return orjson.dumps({"model": "m", "created_at": created, "message": message}) + b"\n"

    return line(0), [line(i) for i in range(n)]


def _chunk(delta: dict[str, Any]) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
    body = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return b"data: " + orjson.dumps({**body, "choices": [choice]}) + b"\n\n"


def _openai_stream(n: int) -> tuple[bytes, list[bytes]]:
    head = _chunk({"role": "assistant", "content": ""}) + _chunk({"content": "Hi"})
    return head, [_chunk({"content": WORDS[i % 6]}) for i in range(n)]


def _answers() -> dict[str, bytes]:
    """A complete answer of each vendor, as its API sends it."""
    usage = {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15}
    message = {"role": "assistant", "content": TEXT}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    head = {"id": "c", "object": "chat.completion", "created": 1, "model": "m"}
    openai = orjson.dumps({**head, "choices": [choice], "usage": usage})
    anthropic = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude",
        "content": [{"type": "text", "text": TEXT}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 9, "output_tokens": 6},
    }
    ollama = {"model": "m", "message": message, "done": True, "done_reason": "stop",
              "prompt_eval_count": 9, "eval_count": 6}  # fmt: skip
    return {
        "openai": openai,
        "azure": openai,
        "anthropic": orjson.dumps(anthropic),
        "ollama": orjson.dumps(ollama),
    }


# Per dialect: the events up to the first token, and one event per content piece.
STREAMS: dict[str, Callable[[int], tuple[bytes, list[bytes]]]] = {
    "openai": _openai_stream,
    "azure": _openai_stream,
    "anthropic": _anthropic_stream,
    "ollama": _ollama_stream,
}


def _cpu(fn: Callable[[], object], n: int) -> float:
    """Seconds of CPU per call of ``fn``, the best of 5 runs of ``n`` calls."""
    best = float("inf")
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t0) / n)
    return best


def measure(name: str, n: int) -> tuple[float, float, float]:
    """(request us, answer us, us per streamed event) for dialect ``name``."""
    cfg = ProviderConfig(name, name, "http://127.0.0.1:1/v1", api_key="k", dialect=name)
    dialect = DIALECTS[name](cfg, 1 << 20)
    plain = Call("chat/completions", BODY, orjson.dumps(BODY), "gpt-bench", False, "r", 0.0)
    streamed = {**BODY, "stream": True}
    call = Call("chat/completions", streamed, orjson.dumps(streamed), "gpt-bench", True, "r", 0.0)
    answer = _answers()[name]

    translator = dialect.request(plain, "gpt-bench")[2]

    def build() -> object:
        return dialect.request(plain, "gpt-bench")

    def reply() -> object:
        return translator.answer(answer), translator.headers(HEADERS)

    head, events = STREAMS[name](EVENTS)
    reads = [b"".join(events[i : i + 4]) for i in range(0, EVENTS, 4)]  # 4 events a read

    def stream() -> None:
        feed = dialect.request(call, "gpt-bench")[2].feed
        state, parser, out = StreamState("p", "r"), SSEParser(1 << 20), []
        first = head if feed is None else feed(head, False)
        state.take(parser.feed(first), out)
        assert state.output or name in ("anthropic", "ollama")
        for piece in reads:
            data = piece if feed is None else feed(piece, False)
            framed = parser.feed_lf(data)
            if framed is None:
                state.take(parser.feed(data), out)
            else:
                state.take_blocks(framed[0], framed[1], out)
            out.clear()
        assert state.failure is None

    req = _cpu(build, n)
    ans = _cpu(reply, n)
    per_event = _cpu(stream, max(1, n // 200)) / EVENTS
    return req * 1e6, ans * 1e6, per_event * 1e6


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="calls per measurement")
    args = parser.parse_args()
    print(f"{'dialect':<10} {'request (us)':>13} {'answer (us)':>12} {'per event (us)':>15}")
    for name in DIALECTS:
        req, ans, event = measure(name, args.n)
        print(f"{name:<10} {req:>13.2f} {ans:>12.2f} {event:>15.2f}")


if __name__ == "__main__":
    main()
