"""What a stream's rescue costs in the gateway's own CPU, without a network (not timed by
CI).

One streamed OpenAI event from the upstream's bytes to the stream state's verdict, as the
relay does after commit (reads of 4 events at a time), four ways: rescue off (the relay's
fast path, every stream without rescue), rescue on before any failure (each event parsed
and its text kept), a rescued stream after the splice (each event re-encoded with the
original ids), and a restarted stream while it reproduces the text sent (compared, held,
nothing written).

    python -m bench.rescue            # about 10 s
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import orjson

from bench.dialects import EVENTS, _cpu, _openai_stream
from gateway.sse import SSEParser
from gateway.stream import StreamState
from gateway.transcript import Splice, Transcript


def _relay(mode: str) -> Callable[[], None]:
    """One stream of EVENTS content events through a stream state, rescue as ``mode``."""
    head, events = _openai_stream(EVENTS)
    reads = [b"".join(events[i : i + 4]) for i in range(0, EVENTS, 4)]
    # What a restarted stream must reproduce: the same stream, already sent.
    sent = Transcript(1 << 20)
    for event in SSEParser(1 << 22).feed(head + b"".join(events)):
        sent.record(orjson.loads(event.data))

    def run() -> None:
        state, parser, out = StreamState("p", "r"), SSEParser(1 << 20), []
        fast = mode == "off"
        if mode == "recording":
            state.transcript = Transcript(1 << 20)
        elif mode == "spliced":
            state.transcript = Transcript(1 << 20)
            state.transcript.splice = Splice(state.transcript, verify=False)
        elif mode == "verifying":
            state.transcript = sent
            sent.splice = Splice(sent, verify=True)
        state.take(parser.feed(head), out)
        for piece in reads:
            framed = parser.feed_lf(piece) if fast else None
            if framed is None:
                state.take(parser.feed(piece), out)
            else:
                state.take_blocks(framed[0], framed[1], out)
            out.clear()
        assert state.failure is None
        if mode == "verifying":
            assert sent.splice is not None and sent.splice.verified

    return run


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="streams per measurement")
    args = parser.parse_args()
    print(f"{'rescue':<34} {'per event (us)':>15}")
    for mode, what in (
        ("off", "off (the relay's fast path)"),
        ("recording", "on, keeping the text sent"),
        ("spliced", "after a rescue, re-encoded"),
        ("verifying", "a restart reproducing the text"),
    ):
        per_event = _cpu(_relay(mode), args.n) / EVENTS
        print(f"{what:<34} {per_event * 1e6:>15.2f}")


if __name__ == "__main__":
    main()
