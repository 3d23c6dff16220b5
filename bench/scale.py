"""Throughput with more than one gateway process (not timed by CI).

Starts the fast fake upstream (``bench/fake_upstream.py``) and, on loopback, the
gateway as

* ``1 process``: ``python -m gateway``, the embedded default;
* ``2 workers``: ``python -m gateway --workers 2`` (one port, SO_REUSEPORT, the workers
  sharing provider state through their supervisor's hub);
* ``3 replicas``: three ``python -m gateway`` processes with ``REDIS_URL`` set, sharing
  provider state through a ``redis-server`` of their own; the load generator sends the
  requests to them in turn, as a load balancer would;
* ``3 replicas, shared limit``: the same with a ``max_concurrency`` on the provider high
  enough never to hold a request back, so that every admission is counted in Redis (one
  round trip per request: what a shared limit costs).

and measures, in rounds that take the targets in turn (as ``bench/run.py`` does),
non-streaming throughput and latency at concurrency 50 and latency at concurrency 1,
with the CPU that each target's processes used (the supervisor and its workers; the
replicas and their Redis). Every load loop is bounded in count and time. Run from the
repository root (``redis-server`` from Debian for the replicas):

    python -m bench.scale                       # about a minute on 2 cores
    python -m bench.scale --rounds 8 --wait-quiet 120
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from pathlib import Path
from typing import Any

from bench.run import (
    CHAT,
    Proc,
    Result,
    Targets,
    children_of,
    fmt,
    free_port,
    gateway_env,
    measure,
    signed,
    spawn,
    start_upstream,
    table,
    wait_quiet,
    wait_ready,
    with_processes,
)

CHAT_PATH = "/v1/chat/completions"


class Target:
    """One way of running the gateway: its URLs (one per replica) and its processes."""

    def __init__(self, name: str, urls: list[str], procs: list[Proc]) -> None:
        self.name, self.urls, self.procs = name, urls, procs

    def cpu(self) -> tuple[float, float]:
        user = system = 0.0
        for proc in self.procs:
            u, s = proc.cpu()
            user, system = user + u, system + s
        return user, system


async def _gateway(
    name: str, up: str, config: Path, tmp: Path, args: argparse.Namespace, *extra: str, **env: str
) -> tuple[str, Proc]:
    port = free_port()
    environ = gateway_env(port, f"{up}/v1", f"{up}/v1", config, args.gateway_log_level)
    environ.update(env)
    proc = spawn(name, [sys.executable, "-m", "gateway", *extra], tmp, environ)
    await wait_ready(proc, f"http://127.0.0.1:{port}/readyz")
    return f"http://127.0.0.1:{port}{CHAT_PATH}", proc


async def _start(args: argparse.Namespace, tmp: Path, procs: list[Proc]) -> list[Target]:
    up, upstream = await start_upstream(50, tmp, procs)
    # As bench/run.py: every request goes to the first provider, never skipped.
    plain = tmp / "gateway.toml"
    plain.write_text("[defaults]\nfail_max = 1000000\nmax_retries = 0\n")
    limited = tmp / "limited.toml"
    limited.write_text(plain.read_text() + "[providers.openai]\nmax_concurrency = 100000\n")
    targets = [Target("direct", [up + CHAT_PATH], [upstream])]

    url, proc = await _gateway("one", up, plain, tmp, args)
    procs.append(proc)
    targets.append(Target("1 process", [url], [proc]))

    url, proc = await _gateway("workers", up, plain, tmp, args, "--workers", str(args.workers))
    procs.append(proc)
    for _ in range(50):  # both workers serving (readiness answers once the first does)
        workers = children_of(proc.popen.pid)
        if len(workers) == args.workers:
            break
        await asyncio.sleep(0.1)
    proc.pids = [proc.popen.pid, *workers]
    await asyncio.sleep(2)  # the second worker's start-up, off the measurement
    targets.append(Target(f"{args.workers} workers", [url], [proc]))

    server = shutil.which("redis-server")
    if server is None:
        print("redis-server not found: no replicas (apt-get install redis-server)",
              file=sys.stderr)  # fmt: skip
        return targets
    for label, config in (("3 replicas", plain), ("3 replicas, shared limit", limited)):
        port = free_port()
        argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no"]  # fmt: skip
        redis = spawn(f"redis-{len(targets)}", argv, tmp)
        procs.append(redis)
        urls, mine = [], [redis]
        for n in range(args.replicas):
            url, proc = await _gateway(
                f"replica-{len(targets)}-{n}", up, config, tmp, args,
                REDIS_URL=f"redis://127.0.0.1:{port}/0",
            )  # fmt: skip
            procs.append(proc)
            urls.append(url)
            mine.append(proc)
        targets.append(Target(label.replace("3", str(args.replicas), 1), urls, mine))
    return targets


async def _phase(
    title: str, targets: list[Target], n: int, concurrency: int, args: argparse.Namespace,
    ours: Targets,
) -> dict[str, Result]:  # fmt: skip
    out: dict[str, Result] = {}
    rounds = args.rounds
    for _ in range(rounds):
        for t in targets:
            res = await measure(
                t.name, t.urls, CHAT, n=n // rounds, concurrency=concurrency,
                cap=args.time_cap / rounds, cpu=t.cpu, ours=ours.ours,
                warm=min(max(2 * concurrency, 50), n // rounds),
            )  # fmt: skip
            out[t.name] = out[t.name].merge(res) if t.name in out else res
    for name, res in out.items():
        errors = f", {res.errors} errors: {res.first_error}" if res.errors else ""
        print(f"  {title:<20} {name:<26} {res.done:>6}  {res.rate() or 0:8.0f}/s  "
              f"others {res.others:.2f} cores{errors}", file=sys.stderr, flush=True)  # fmt: skip
    return out


async def _run(args: argparse.Namespace, tmp: Path, procs: list[Proc]) -> None:
    targets = await _start(args, tmp, procs)
    ours = Targets({}, {}, procs)  # for the CPU that other processes use meanwhile
    if args.wait_quiet > 0:
        await wait_quiet(ours, args.wait_quiet)
    n = args.requests
    r50 = await _phase("non-streaming c=50", targets, 3 * n, 50, args, ours)
    r1 = await _phase("non-streaming c=1", targets, n, 1, args, ours)
    names = [t.name for t in targets]
    one = r50["1 process"].rate()

    def row(label: str, values: dict[str, Any], key: Any, digits: int = 3) -> list[str]:
        return [label, *(fmt(key(values[name]), digits) for name in names)]

    rows = [
        row("c=50 throughput (req/s)", r50, Result.rate, 0),
        [
            "c=50 throughput vs 1 process",
            *(
                "" if name == "direct" or not one else f"{(r50[name].rate() or 0) / one:.2f}x"
                for name in names
            ),
        ],
        row("c=50 latency p50 (ms)", r50, Result.p50),
        row("c=50 latency p99 (ms)", r50, Result.p99),
        row("c=50 CPU per request, all its processes (ms)", r50, Result.cpu_per_request_ms),
        [
            "c=1 latency p50 (ms), added to direct",
            *(
                fmt(r1[name].p50())
                if name == "direct"
                else signed(r1[name].p50() - r1["direct"].p50())
                for name in names
            ),
        ],
    ]
    print(
        table(
            f"More than one process: {3 * n} requests at c=50 and {n} at c=1 per target, "
            f"{args.rounds} rounds (the 'direct' CPU is the fake upstream's own)",
            ["", *names],
            rows,
        )
    )
    worst = max(v.others for d in (r50, r1) for v in d.values())
    print(f"Other processes on this machine used at most {worst:.2f} cores during a phase.")
    errors = [f"{t}: {v.errors} ({v.first_error})" for d in (r50, r1) for t, v in d.items()
              if v.errors]  # fmt: skip
    if errors:
        print("ERRORS: " + "; ".join(errors))


async def main_async(args: argparse.Namespace) -> None:
    await with_processes("gateway-bench-scale-", lambda tmp, procs: _run(args, tmp, procs))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Throughput of workers and replicas")
    parser.add_argument("--requests", type=int, default=2000, help="at c=1 (x3 at c=50)")
    parser.add_argument("--workers", type=int, default=2, help="--workers of the gateway")
    parser.add_argument("--replicas", type=int, default=3, help="replicas sharing Redis")
    parser.add_argument("--rounds", type=int, default=4, help="rounds over the targets")
    parser.add_argument("--time-cap", type=float, default=30.0, help="seconds per phase")
    parser.add_argument("--gateway-log-level", default="INFO")
    parser.add_argument(
        "--wait-quiet", type=float, default=0.0, metavar="SECONDS",
        help="first wait up to SECONDS for other processes to stop using the CPU",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if min(args.requests, args.rounds, args.workers - 1, args.replicas) < 1:
        parser.error("--requests, --rounds and --replicas must be positive, --workers above 1")
    if args.time_cap <= 0:
        parser.error("--time-cap must be positive")
    try:
        asyncio.run(main_async(args))
    except asyncio.CancelledError:
        sys.exit(130)


if __name__ == "__main__":
    main()
