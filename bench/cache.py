"""What a cache hit adds, next to a plain pass-through (not timed by CI).

Starts the fast fake upstream (``bench/fake_upstream.py``) and one gateway
(``python -m gateway``, the in-memory cache), and with ``--redis`` (when ``redis-server``
is installed) a second gateway whose cache is a ``redis-server`` of its own, all on
loopback. Then, in rounds that take the targets in turn (as ``bench/run.py`` does), it
measures the same deterministic request sent

* ``direct`` to the fake upstream;
* ``pass-through``: through the gateway without the cache header (the plain route);
* ``hit``: through the gateway with ``x-gateway-cache: use`` (after the first request,
  every one is a hit: nothing goes upstream);
* ``refresh``: with ``x-gateway-cache: refresh``, the miss path (the upstream call made
  by a flight of its own, then the answer stored);
* ``redis hit``: a hit from Redis (``--redis``).

Latency p50/p99 at concurrency 1 and the gateway's CPU per request at concurrency 50,
for complete answers and for 50-chunk streams (time to first token and whole stream).
Every load loop is bounded in count and time. Run from the repository root:

    python -m bench.cache            # about 40 s on 2 cores
    python -m bench.cache --redis    # also a hit served from Redis
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from pathlib import Path
from typing import Any

import aiohttp

from bench.run import (
    CHAT,
    Proc,
    Result,
    Targets,
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

BODY = {**CHAT, "temperature": 0}
MODES = {"pass-through": None, "hit": "use", "refresh": "refresh", "redis hit": "use"}


async def _send(url: str, body: dict[str, Any], mode: str | None) -> str | None:
    """One request; its x-gateway-cache header."""
    headers = {"x-gateway-cache": mode} if mode else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as resp,
    ):
        await resp.read()
        if resp.status != 200:
            raise SystemExit(f"{url} with {headers}: status {resp.status}")
        return resp.headers.get("x-gateway-cache")


async def _phase(
    title: str,
    targets: dict[str, tuple[str, str | None, Proc | None]],
    body: dict[str, Any],
    n: int,
    concurrency: int,
    rounds: int,
    cap: float,
    ours: Targets,
) -> dict[str, Result]:
    out: dict[str, Result] = {}
    for _ in range(rounds):
        for name, (url, mode, proc) in targets.items():
            headers = {"x-gateway-cache": mode} if mode else None
            res = await measure(
                name, url, body, n=n // rounds, concurrency=concurrency, cap=cap / rounds,
                cpu=proc.cpu if proc is not None else None, headers=headers, ours=ours.ours,
                warm=min(max(2 * concurrency, 50), n // rounds),
            )  # fmt: skip
            out[name] = out[name].merge(res) if name in out else res
    for name, res in out.items():
        errors = f", {res.errors} errors: {res.first_error}" if res.errors else ""
        print(f"  {title:<22} {name:<13} {res.done:>6}  p50 {res.p50():7.3f} ms{errors}",
              file=sys.stderr, flush=True)  # fmt: skip
    return out


async def _run(args: argparse.Namespace, tmp: Path, procs: list[Proc]) -> None:
    py = sys.executable
    up, _ = await start_upstream(args.chunks, tmp, procs)
    chat = "/v1/chat/completions"
    config = tmp / "gateway.toml"
    # Without coalescing, "refresh" is the whole miss path at c=50 too: identical requests
    # in flight would otherwise share one upstream call.
    config.write_text("[cache]\nttl = 3600\ncoalesce = false\n")
    gateways: dict[str, tuple[str, Proc]] = {}
    redis_url = None
    if args.redis:
        server = shutil.which("redis-server")
        if server is None:
            print("redis-server not found: no Redis column (apt-get install redis-server)",
                  file=sys.stderr)  # fmt: skip
        else:
            port = free_port()
            argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no"]  # fmt: skip
            procs.append(spawn("redis", argv, tmp))
            redis_url = f"redis://127.0.0.1:{port}/0"
    for name, url in (("memory", None), ("redis", redis_url)):
        if name == "redis" and url is None:
            continue
        port = free_port()
        env = gateway_env(port, f"{up}/v1", f"{up}/v1", config, args.gateway_log_level)
        if url is not None:
            env["REDIS_URL"] = url
        proc = spawn(f"gateway-{name}", [py, "-m", "gateway"], tmp, env)
        procs.append(proc)
        await wait_ready(proc, f"http://127.0.0.1:{port}/healthz")
        gateways[name] = (f"http://127.0.0.1:{port}{chat}", proc)

    targets: dict[str, tuple[str, str | None, Proc | None]] = {"direct": (up + chat, None, None)}
    for name, mode in MODES.items():
        which = "redis" if name == "redis hit" else "memory"
        if which in gateways:
            url, proc = gateways[which]
            targets[name] = (url, mode, proc)
    # Another user: its own entry, stored as a stream (a stream hit replays stored bytes).
    stream = {**BODY, "stream": True, "bench_chunks": args.chunks, "user": "stream"}
    expect = {"pass-through": None, "hit": "hit", "refresh": "miss", "redis hit": "hit"}
    for body in (BODY, stream):  # store both, then check that each target is what it says
        for _ in range(2):
            got = {name: await _send(url, body, mode) for name, (url, mode, _) in targets.items()}
        for name, want in expect.items():
            if name in got and got[name] != want:
                raise SystemExit(f"{name}: x-gateway-cache {got[name]!r}, expected {want!r}")

    ours = Targets({}, {}, procs)  # for the CPU that other processes use meanwhile
    if args.wait_quiet > 0:
        await wait_quiet(ours, args.wait_quiet)
    n, rounds, cap = args.requests, args.rounds, args.time_cap
    r = {
        "ns1": await _phase("non-streaming c=1", targets, BODY, n, 1, rounds, cap, ours),
        "ns50": await _phase("non-streaming c=50", targets, BODY, 3 * n, 50, rounds, cap, ours),
        "st1": await _phase("streaming c=1", targets, stream, n // 4, 1, rounds, cap, ours),
        "st50": await _phase("streaming c=50", targets, stream, n, 50, rounds, cap, ours),
    }
    names = list(targets)
    others = names[1:]

    def row(label: str, key: str, metric: Any, added: bool = True, digits: int = 3) -> list[str]:
        base = metric(r[key]["direct"])
        cells = [label, fmt(base, digits)]
        for name in others:
            value = metric(r[key][name])
            text = fmt(value, digits)
            if added and value is not None and base is not None:
                text += f" ({signed(value - base, digits)})"
            cells.append(text)
        return cells

    rows = [
        row("c=1  latency p50 (ms)", "ns1", Result.p50),
        row("c=1  latency p99 (ms)", "ns1", Result.p99),
        row("c=50 throughput (req/s)", "ns50", Result.rate, added=False, digits=0),
        row("c=50 gateway CPU per request (ms) *", "ns50", Result.cpu_per_request_ms, False),
        row("stream c=1 TTFT p50 (ms)", "st1", Result.ttft50),
        row("stream c=1 whole stream p50 (ms)", "st1", Result.p50),
        row("stream c=50 gateway CPU per stream (ms) *", "st50", Result.cpu_per_request_ms, False),
    ]
    errors = [f"{k}/{t}: {v.errors}" for k, d in r.items() for t, v in d.items() if v.errors]
    print(
        table(
            f"Cache hit vs pass-through: value, and in brackets what it adds to 'direct' "
            f"({n} requests at c=1, {args.chunks}-chunk streams)",
            ["", *names],
            rows,
        )
    )
    print("* CPU of the gateway process; in the 'direct' column the fake upstream's own.")
    worst = max(v.others for d in r.values() for v in d.values())
    print(f"Other processes on this machine used at most {worst:.2f} cores during a phase.")
    if errors:
        print("ERRORS: " + "; ".join(errors))


async def main_async(args: argparse.Namespace) -> None:
    await with_processes("gateway-bench-cache-", lambda tmp, procs: _run(args, tmp, procs))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A cache hit's cost next to a pass-through")
    parser.add_argument("--requests", type=int, default=2000, help="at c=1 (x3 at c=50)")
    parser.add_argument("--chunks", type=int, default=50, help="content chunks a stream")
    parser.add_argument("--rounds", type=int, default=4, help="rounds over the targets")
    parser.add_argument("--time-cap", type=float, default=30.0, help="seconds per phase")
    parser.add_argument("--redis", action="store_true", help="also a hit from Redis")
    parser.add_argument("--gateway-log-level", default="INFO")
    parser.add_argument(
        "--wait-quiet", type=float, default=0.0, metavar="SECONDS",
        help="first wait up to SECONDS for other processes to stop using the CPU",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if min(args.requests, args.chunks, args.rounds) < 1 or args.time_cap <= 0:
        parser.error("--requests, --chunks, --rounds and --time-cap must be positive")
    try:
        asyncio.run(main_async(args))
    except asyncio.CancelledError:
        sys.exit(130)


if __name__ == "__main__":
    main()
