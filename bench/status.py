"""What the status page costs a request: a micro-benchmark of its recorder (not timed by CI).

Times, per finished request, on this process's CPU:

* ``StatusRecorder.record`` with nobody watching (what every request pays), for a plain
  request and for a failover (two attempts);
* the same with a page watching (the broadcaster then also encodes each request once, in
  batches: that encoding is timed separately);
* ``server._finish`` (metrics, the log line and the recorder) against the same function
  with a recorder that does nothing, in interleaved rounds, so the recorder's share of
  the request's own bookkeeping is measured where it is paid, with the spread of the
  round-by-round differences (the noise it has to stand out from).

Run from the repository root:

    python -m bench.status             # about 20 s
    python -m bench.status --n 50000   # quicker, noisier
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any
from unittest import mock

import orjson

from gateway import server
from gateway.call import AttemptRecord, Call
from gateway.errors import Outcome
from gateway.status import StatusRecorder


def make_call(chain: list[str]) -> Call:
    """A finished non-streaming call answered by the last provider of ``chain``."""
    providers = {name: SimpleNamespace(name=name) for name in chain}
    call = Call("chat/completions", {}, b"", "gpt-4o-mini", False, os.urandom(16).hex(), 0.0)
    outcomes = [Outcome.RATE_LIMITED] * (len(chain) - 1) + [Outcome.OK]
    call.records = [
        AttemptRecord(providers[n], o, "")  # type: ignore[arg-type]
        for n, o in zip(chain, outcomes, strict=True)
    ]
    call.answered_by = providers[chain[-1]]  # type: ignore[assignment]
    call.first_route = providers[chain[0]]  # type: ignore[assignment]
    call.status = 200
    return call


def per_call_ns(fn: Callable[[], Any], n: int, repeat: int) -> float:
    """The best of ``repeat`` runs of ``n`` calls, in ns per call (the least disturbed)."""
    runs = []
    for _ in range(repeat):
        start = time.process_time_ns()
        for _ in range(n):
            fn()
        runs.append((time.process_time_ns() - start) / n)
    return min(runs)


class _NoRecorder:
    """A recorder that records nothing: ``_finish`` without the status page."""

    def record(self, call: Call, model: str, elapsed: float) -> None:
        """Do nothing."""


async def measure(n: int, repeat: int, rounds: int) -> dict[str, float]:
    names = ["openai", "lmstudio", "ollama"]
    plain, failover = make_call(["openai"]), make_call(["openai", "lmstudio"])
    out: dict[str, float] = {}

    rec = StatusRecorder(names)
    out["record, nobody watching"] = per_call_ns(
        lambda: rec.record(plain, "other", 0.0012), n, repeat
    )
    out["record a failover, nobody watching"] = per_call_ns(
        lambda: rec.record(failover, "other", 0.0012), n, repeat
    )
    with rec.watch(mock.Mock()):  # a watcher whose queue is never read (dropped when full)
        out["record, a page watching"] = per_call_ns(
            lambda: rec.record(plain, "other", 0.0012), n, repeat
        )
    entry = rec.requests[-1]
    out["encode one request for watchers (once, in a batch)"] = per_call_ns(
        lambda: orjson.dumps(rec._request_json(entry)), n // 4, repeat
    )
    await rec.close()

    # _finish as the gateway runs it: the metrics, one INFO line to a file, the recorder.
    # Interleaved rounds in alternating order, so drift on the machine hits both alike.
    handler = logging.FileHandler(os.devnull)
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    try:
        known = frozenset({"demo-model"})
        variants: dict[str, Any] = {"without": _NoRecorder(), "with": StatusRecorder(names)}
        samples: dict[str, list[float]] = {"without": [], "with": []}
        block = max(1, n // 40)
        for i in range(rounds):
            for name in ("without", "with") if i % 2 else ("with", "without"):
                recorder = variants[name]
                samples[name].append(
                    per_call_ns(lambda r=recorder: server._finish(plain, known, r), block, 1)
                )
        diffs = [w - wo for w, wo in zip(samples["with"], samples["without"], strict=True)]
        out["_finish without the recorder"] = statistics.median(samples["without"])
        out["_finish with the recorder"] = statistics.median(samples["with"])
        q1, median, q3 = statistics.quantiles(diffs, n=4)
        out["the recorder inside _finish (median of round differences)"] = median
        out["  interquartile range of the differences, low"] = q1
        out["  interquartile range of the differences, high"] = q3
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    return out


def main() -> None:
    """Print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="calls per run (default 200000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best counts (default 5)")
    parser.add_argument(
        "--rounds", type=int, default=40, help="interleaved _finish rounds (default 40)"
    )
    args = parser.parse_args()
    figures = asyncio.run(measure(args.n, args.repeat, args.rounds))
    width = max(map(len, figures))
    for name, ns in figures.items():
        print(f"{name:<{width}}  {ns / 1000:7.2f} us")


if __name__ == "__main__":
    main()
