"""The long soak, by hand: the CI soak (``tests/soak/test_soak.py``) with a larger budget.

Same fake providers, fault tables, invariants and measurements; only the request count,
the concurrency, the seed and the time cap change. Bounded in count and in time. Run
from the repository root:

    python -m bench.soak                                  # 20000 requests, 500 clients
    python -m bench.soak --requests 50000 --concurrency 800 --time-cap 900

Prints the figures; the exit status is 1 when an invariant broke.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from tests.soak.test_soak import SEED, run_soak

MAX_REQUESTS = 1_000_000
MAX_TIME_CAP = 3600.0


def main(argv: list[str] | None = None) -> int:
    """Run one soak and report; 0 when every invariant held."""
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000, help="requests in all")
    parser.add_argument("--concurrency", type=int, default=500, help="clients at once")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--time-cap", type=float, default=600.0, help="seconds before the run is cut short"
    )
    args = parser.parse_args(argv)
    if not 2 <= args.requests <= MAX_REQUESTS:
        parser.error(f"--requests must be in [2, {MAX_REQUESTS}]")
    if not 1 <= args.concurrency <= args.requests:
        parser.error("--concurrency must be in [1, --requests]")
    if not 0 < args.time_cap <= MAX_TIME_CAP:
        parser.error(f"--time-cap must be in (0, {MAX_TIME_CAP:g}]")
    report = asyncio.run(run_soak(args.requests, args.concurrency, args.seed, args.time_cap))
    print(report.summary())
    problems = report.problems()
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
