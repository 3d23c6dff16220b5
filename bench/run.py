"""The gateway benchmark (not timed by CI): direct upstream vs the gateway, on loopback.

Starts, each in its own process: the fake upstream (``bench/fake_upstream.py``), a bare
aiohttp pass-through proxy (``bench/bare_proxy.py``), two gateways
(``python -m gateway``), and with ``--nginx`` a plain nginx reverse proxy. This process is
the load generator (an aiohttp client). It measures

* non-streaming latency p50/p99 and throughput at concurrency 1 and 50;
* streaming time to first token p50/p99 and chunks per second at concurrency 1 and 50,
  with chunks written back to back, and at concurrency 50 with chunks paced 10 ms apart
  (one upstream read per chunk, as with a real model);
* the CPU time of the process under test per request and per relayed SSE event, from
  ``utime + stime`` in ``/proc/PID/stat`` before and after each measured phase;
* the cost of a failover: gateway B's first provider answers every request with a 429,
  so each request goes 429 -> next provider; compared with gateway A's plain route.

Every load loop is bounded in count and in time. Run from the repository root:

    python -m bench.run            # full run, about a minute on 2 cores
    python -m bench.run --quick    # a smoke run, about 20 seconds
    python -m bench.run --nginx    # add the nginx yardstick (apt-get install nginx-light)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL = "gpt-bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")
TOKEN_MARK = b'"content":" token"'  # in every content chunk of the fake upstream, only there
DONE_TAIL = b"data: [DONE]\n\n"
PACED_MS = 10.0
CLIENT_TIMEOUT = 15.0  # per request
NOISY = 0.1  # cores used by other processes during a phase that make its numbers suspect

CHAT = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Say hello in one short sentence."},
    ],
    "temperature": 0.7,
    "max_tokens": 64,
}

# The targets of DESIGN.md section 5.
T_ADDED_P50_MS = 0.4
T_ADDED_P99_MS = 1.0
T_CPU_REQ_MS = 0.3
T_TTFT_MS = 0.5
T_CPU_EVENT_US = 10.0
T_FAILOVER_MS = 0.5


# -- processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat(pid: int | str) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rpartition(b")")[2].split()  # fields from 3 (state) on


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid``, all its threads, in seconds."""
    fields = _stat(pid)
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def machine_busy() -> float:
    """CPU seconds all processes have used since boot (every core), from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK  # less idle and iowait


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat(entry)[1]) == pid:
                    out.append(int(entry))
            except OSError:
                continue
    return out


@dataclass
class Proc:
    """A process we started, and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    pids: list[int] = field(default_factory=list)  # whose CPU counts; default the process

    def cpu(self) -> tuple[float, float]:
        user = system = 0.0
        for pid in self.pids or [self.popen.pid]:
            u, s = cpu_times(pid)
            user += u
            system += s
        return user, system

    def check(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def raise_fd_limit() -> None:
    """Allow this process (and what it starts) the file descriptors of 1,000 open streams
    (a client and an upstream connection each in a proxy)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def spawn(
    name: str,
    argv: list[str],
    tmp: Path,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
) -> Proc:
    log = tmp / f"{name}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            preexec_fn=raise_fd_limit,
        )
    return Proc(name, popen, log)


def rss_mb(pids: list[int]) -> float:
    """Resident memory of ``pids`` together, in MB (VmRSS)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=False))["ListenOverflows"])
    return 0


async def wait_ready(proc: Proc, url: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        while True:
            proc.check()
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{proc.name} not ready at {url} after {within:g}s")
            await asyncio.sleep(0.1)


def gateway_env(
    port: int,
    first: str,
    second: str,
    config: Path,
    log_level: str,
    event_loop: str = "asyncio",
    backlog: int = 1024,
) -> dict[str, str]:
    """The environment of a gateway routing OpenAI to ``first``, LM Studio to ``second``."""
    prefixes = ("OPENAI_", "LMSTUDIO_", "OLLAMA_", "GATEWAY_", "FAILOVER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(
        OPENAI_BASE_URL=first,
        OPENAI_API_KEY="bench",
        LMSTUDIO_BASE_URL=second,
        LMSTUDIO_MODEL=MODEL,  # the client's model: the body goes on unchanged
        OLLAMA_BASE_URL="",
        FAILOVER_ORDER="openai,lmstudio",
        GATEWAY_HOST="127.0.0.1",
        GATEWAY_PORT=str(port),
        GATEWAY_CONFIG=str(config),
        GATEWAY_LOG_LEVEL=log_level,
        GATEWAY_EVENT_LOOP=event_loop,
        GATEWAY_BACKLOG=str(backlog),
        GATEWAY_MAX_CLIENT_CONNECTIONS="4096",  # the open-streams and burst phases
    )
    return env


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    upstream fake {{ server 127.0.0.1:{upstream}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


# -- load -----------------------------------------------------------------------------


@dataclass
class Result:
    """One measured phase against one target."""

    target: str
    n: int
    concurrency: int
    ok: int = 0
    errors: int = 0
    first_error: str = ""
    timed_out: bool = False
    latencies: list[float] = field(default_factory=list)  # s: whole response or stream
    ttfts: list[float] = field(default_factory=list)  # s: streams only
    chunks: int = 0  # content chunks received
    events: int = 0  # SSE events received
    failovers: int = 0  # responses with x-gateway-failover: true
    wall: float = 0.0
    cpu_user: float | None = None  # CPU seconds of the process under test
    cpu_sys: float | None = None
    others: float = 0.0  # cores busy with processes this benchmark did not start

    def merge(self, other: Result) -> Result:
        """This result and ``other`` (a later round against the same target) as one."""
        wall = self.wall + other.wall
        cpu_user = cpu_sys = None
        if self.cpu_user is not None and other.cpu_user is not None:
            cpu_user = self.cpu_user + other.cpu_user
        if self.cpu_sys is not None and other.cpu_sys is not None:
            cpu_sys = self.cpu_sys + other.cpu_sys
        return Result(
            target=self.target,
            n=self.n + other.n,
            concurrency=self.concurrency,
            ok=self.ok + other.ok,
            errors=self.errors + other.errors,
            first_error=self.first_error or other.first_error,
            timed_out=self.timed_out or other.timed_out,
            latencies=self.latencies + other.latencies,
            ttfts=self.ttfts + other.ttfts,
            chunks=self.chunks + other.chunks,
            events=self.events + other.events,
            failovers=self.failovers + other.failovers,
            wall=wall,
            cpu_user=cpu_user,
            cpu_sys=cpu_sys,
            others=(self.others * self.wall + other.others * other.wall) / wall if wall else 0.0,
        )

    def error(self, text: str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = text[:300]

    @property
    def done(self) -> int:
        return self.ok + self.errors

    @property
    def cpu(self) -> float | None:
        if self.cpu_user is None or self.cpu_sys is None:
            return None
        return self.cpu_user + self.cpu_sys

    def rate(self) -> float | None:
        return self.done / self.wall if self.wall else None

    def chunk_rate(self) -> float | None:
        return self.chunks / self.wall if self.wall else None

    def cpu_per_request_ms(self) -> float | None:
        cpu = self.cpu
        return None if cpu is None or not self.done else cpu / self.done * 1000

    def cpu_per_event_us(self) -> float | None:
        cpu = self.cpu
        return None if cpu is None or not self.events else cpu / self.events * 1e6

    def p50(self) -> float:
        return pct(self.latencies, 50)

    def p99(self) -> float:
        return pct(self.latencies, 99)

    def ttft50(self) -> float:
        return pct(self.ttfts, 50)

    def ttft99(self) -> float:
        return pct(self.ttfts, 99)

    def summary(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "n": self.n,
            "concurrency": self.concurrency,
            "ok": self.ok,
            "errors": self.errors,
            "first_error": self.first_error,
            "timed_out": self.timed_out,
            "wall_s": self.wall,
            "rate_per_s": self.rate(),
            "p50_ms": self.p50(),
            "p99_ms": self.p99(),
            "ttft_p50_ms": self.ttft50(),
            "ttft_p99_ms": self.ttft99(),
            "chunks": self.chunks,
            "chunks_per_s": self.chunk_rate(),
            "events": self.events,
            "failovers": self.failovers,
            "cpu_user_s": self.cpu_user,
            "cpu_sys_s": self.cpu_sys,
            "cpu_per_request_ms": self.cpu_per_request_ms(),
            "cpu_per_event_us": self.cpu_per_event_us(),
            "other_processes_cores": self.others,
        }


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``values`` (seconds), in ms."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] * 1000


async def _one(
    session: aiohttp.ClientSession, url: str, body: bytes, stream: bool, res: Result | None
) -> None:
    """One request; its numbers go to ``res`` (None while warming up)."""
    start = time.perf_counter()
    first: float | None = None
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            if r.status != 200 or not stream:
                data = await r.read()
            else:
                buf = bytearray()
                async for piece in r.content.iter_any():
                    if first is None:
                        scan = max(0, len(buf) - len(TOKEN_MARK))
                        buf += piece
                        if buf.find(TOKEN_MARK, scan) >= 0:
                            first = time.perf_counter()
                    else:
                        buf += piece
                data = bytes(buf)
            failover = r.headers.get("x-gateway-failover") == "true"
            status = r.status
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        if res is not None:
            res.error(f"{type(e).__name__}: {e}")
        return
    end = time.perf_counter()
    if res is None:
        return
    if status != 200:
        res.error(f"HTTP {status}: {data[:200]!r}")
        return
    res.failovers += failover
    if stream:
        chunks = data.count(TOKEN_MARK)
        if first is None or not data.endswith(DONE_TAIL):
            res.error(f"incomplete stream ({chunks} chunks): {data[-200:]!r}")
            return
        res.ttfts.append(first - start)
        res.chunks += chunks
        res.events += data.count(b"\n\n")
    res.ok += 1
    res.latencies.append(end - start)


async def _drive(
    session: aiohttp.ClientSession,
    url: str | Sequence[str],
    body: bytes,
    stream: bool,
    n: int,
    concurrency: int,
    cap: float,
    res: Result | None,
) -> None:
    """``n`` requests from ``concurrency`` workers; none starts after ``cap`` seconds.
    Several URLs (replicas) take the requests in turn."""
    deadline = time.perf_counter() + cap
    todo: Iterator[int] = iter(range(n))
    urls = [url] if isinstance(url, str) else list(url)

    async def worker() -> None:
        for i in todo:  # shared: each request is taken by exactly one worker
            if time.perf_counter() > deadline:
                if res is not None:
                    res.timed_out = True
                return
            await _one(session, urls[i % len(urls)], body, stream, res)

    # Each request has its own client timeout, so the phase ends by cap + CLIENT_TIMEOUT.
    async with asyncio.timeout(cap + CLIENT_TIMEOUT + 5):
        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def measure(
    name: str,
    url: str | Sequence[str],
    body: dict[str, Any],
    *,
    n: int,
    concurrency: int,
    cap: float,
    cpu: Callable[[], tuple[float, float]] | None,
    ours: Callable[[], float] | None = None,
    warm: int | None = None,
    headers: dict[str, str] | None = None,
) -> Result:
    """Warm up (also opens the connections), then measure ``n`` requests (each with
    ``headers``, if given)."""
    stream = bool(body.get("stream"))
    raw = orjson.dumps(body)
    res = Result(name, n, concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=headers
    ) as session:
        warm = max(2 * concurrency, 50) if warm is None else warm
        await _drive(session, url, raw, stream, warm, concurrency, cap, None)
        gc.collect()
        before = cpu() if cpu is not None else (0.0, 0.0)
        ours0, busy0 = (ours(), machine_busy()) if ours is not None else (0.0, 0.0)
        t0 = time.perf_counter()
        await _drive(session, url, raw, stream, n, concurrency, cap, res)
        res.wall = time.perf_counter() - t0
        if cpu is not None:
            after = cpu()
            res.cpu_user, res.cpu_sys = after[0] - before[0], after[1] - before[1]
        if ours is not None and res.wall > 0:
            other = (machine_busy() - busy0) - (ours() - ours0)
            res.others = max(0.0, other) / res.wall
    return res


@dataclass
class Targets:
    urls: dict[str, str]  # name -> chat completions URL
    cpu: dict[str, Callable[[], tuple[float, float]]]  # name -> CPU of what is measured
    procs: list[Proc]
    rounds: int = 4  # each phase takes the targets in turn this many times
    retries: int = 0  # times a measurement disturbed by other processes is repeated
    quiet_wait: float = 0.0  # seconds to wait for a quiet machine before each attempt

    def ours(self) -> float:
        """CPU seconds used by this process and every process it started."""
        total = sum(cpu_times(os.getpid()))
        for p in self.procs:
            if p.popen.poll() is None:
                total += sum(p.cpu())
        return total


async def phase(
    title: str,
    names: list[str],
    targets: Targets,
    body: dict[str, Any],
    n: int,
    concurrency: int,
    cap: float,
) -> dict[str, Result]:
    """``n`` requests per target, in rounds that take the targets in turn (so that a slow
    drift of the machine touches every target alike); all within ``cap`` seconds each."""
    out: dict[str, Result] = {}
    rounds = max(1, min(targets.rounds, n // concurrency))
    for rnd in range(rounds):
        share = n // rounds + (1 if rnd < n % rounds else 0)
        for name in names:
            res = await _attempts(title, name, targets, body, share, concurrency, cap / rounds)
            out[name] = out[name].merge(res) if name in out else res
    for name, res in out.items():
        note = f", {res.errors} errors: {res.first_error}" if res.errors else ""
        note += " (time cap reached)" if res.timed_out else ""
        if res.others > NOISY:
            note += f" (other processes busy: {res.others:.2f} cores)"
        print(
            f"  {title:<26} {name:<9} {res.done:>6} in {res.wall:6.2f}s  "
            f"p50 {res.p50():8.3f} ms{note}",
            file=sys.stderr,
            flush=True,
        )
    return out


async def _attempts(
    title: str,
    name: str,
    targets: Targets,
    body: dict[str, Any],
    n: int,
    concurrency: int,
    cap: float,
) -> Result:
    """One measurement, repeated (``targets.retries``) while other processes disturb it."""
    best: Result | None = None
    for attempt in range(1 + targets.retries):
        for p in targets.procs:
            p.check()
        if attempt:
            print(
                f"    {title}, {name}: other processes busy ({best.others if best else 0:.2f} "
                "cores), measuring again",
                file=sys.stderr,
                flush=True,
            )
            if targets.quiet_wait > 0:
                await wait_quiet(targets, targets.quiet_wait)
        res = await measure(
            name,
            targets.urls[name],
            body,
            n=n,
            concurrency=concurrency,
            cap=cap,
            cpu=targets.cpu.get(name),
            ours=targets.ours,
            warm=min(max(2 * concurrency, 50), n),
        )
        if best is None or res.others < best.others:
            best = res
        if res.others <= NOISY:
            break
    assert best is not None
    return best


async def open_streams_phase(
    names: list[str], targets: Targets, n: int, cap: float
) -> dict[str, dict[str, float]]:
    """``n`` slow streams open at once against each target: its RSS while they are open
    and after they have ended (memory a proxy keeps per stream, and gives back)."""
    out: dict[str, dict[str, float]] = {}
    body = orjson.dumps(
        {**CHAT, "stream": True, "bench_chunks": 20, "bench_interval_ms": 500}
    )  # 10 s a stream
    for name in names:
        proc = next(p for p in targets.procs if p.name == name)
        pids = proc.pids or [proc.popen.pid]
        gc.collect()
        before = rss_mb(pids)
        opened = asyncio.Event()
        firsts = 0
        errors = 0
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=cap + 30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def one(url: str = targets.urls[name], opened: asyncio.Event = opened) -> None:
                nonlocal firsts, errors
                try:
                    async with session.post(
                        url, data=body, headers={"Content-Type": "application/json"}
                    ) as resp:
                        await resp.content.readany()
                        firsts += 1
                        if firsts == n:
                            opened.set()
                        await resp.read()
                        if resp.status != 200:
                            errors += 1
                except (aiohttp.ClientError, TimeoutError, OSError):
                    errors += 1
                    if firsts + errors == n:
                        opened.set()

            tasks = [asyncio.create_task(one()) for _ in range(n)]
            try:
                async with asyncio.timeout(cap):
                    await opened.wait()
            except TimeoutError:
                pass
            during = rss_mb(pids)
            await asyncio.gather(*tasks)
        await asyncio.sleep(1)
        after = rss_mb(pids)
        out[name] = {
            "streams": n,
            "opened": firsts,
            "errors": errors,
            "rss_before_mb": before,
            "rss_open_mb": during,
            "rss_after_mb": after,
            "kb_per_stream": (during - before) * 1024 / max(1, firsts),
        }
        print(
            f"  {n} open streams {name:<9} opened {firsts}, errors {errors}, RSS {before:.0f} "
            f"-> {during:.0f} -> {after:.0f} MB",
            file=sys.stderr,
            flush=True,
        )
    return out


async def burst_phase(
    names: list[str], targets: Targets, n: int, cap: float
) -> dict[str, dict[str, float]]:
    """``n`` new connections at once, one request each: the listen queue must hold them
    (the kernel's ListenOverflows counter), or clients wait for SYN retransmits."""
    out: dict[str, dict[str, float]] = {}
    body = orjson.dumps(CHAT)
    for name in names:
        res = Result(name, n, n)
        overflows = listen_overflows()
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            start = asyncio.Event()

            async def one(
                url: str = targets.urls[name], start: asyncio.Event = start, res: Result = res
            ) -> None:
                await start.wait()
                await _one(session, url, body, False, res)

            tasks = [asyncio.create_task(one()) for _ in range(n)]
            await asyncio.sleep(0.1)
            start.set()
            async with asyncio.timeout(cap + CLIENT_TIMEOUT):
                await asyncio.gather(*tasks)
        out[name] = {
            "connections": n,
            "ok": res.ok,
            "errors": res.errors,
            "listen_overflows": listen_overflows() - overflows,
            "p50_ms": res.p50(),
            "p90_ms": pct(res.latencies, 90),
            "p99_ms": res.p99(),
        }
        print(
            f"  burst of {n} {name:<9} ok {res.ok}, overflows {out[name]['listen_overflows']}, "
            f"p90 {out[name]['p90_ms']:.1f} ms",
            file=sys.stderr,
            flush=True,
        )
        await asyncio.sleep(1)
    return out


# -- the run --------------------------------------------------------------------------


async def with_processes(
    prefix: str, body: Callable[[Path, list[Proc]], Awaitable[T]], keep: bool = False
) -> T:
    """``body(tmp, procs)`` in a fresh temporary directory; every process it adds to
    ``procs`` is stopped at the end (SIGINT and SIGTERM end the run there too), and the
    directory removed unless ``keep``."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    procs: list[Proc] = []
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # stop what we started, then exit
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await body(tmp, procs)
    finally:
        for p in reversed(procs):
            p.stop()
        if keep:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    return await with_processes(
        "gateway-bench-", lambda tmp, procs: _run(args, tmp, procs), args.keep_logs
    )


async def start_upstream(chunks: int, tmp: Path, procs: list[Proc]) -> tuple[str, Proc]:
    """The fake upstream, ready: its base URL (without /v1) and its process."""
    port = free_port()
    upstream = spawn(
        "upstream",
        [sys.executable, str(HERE / "fake_upstream.py"), "--port", str(port), "--model", MODEL,
         "--chunks", str(chunks)],
        tmp,
    )  # fmt: skip
    procs.append(upstream)
    up = f"http://127.0.0.1:{port}"
    await wait_ready(upstream, f"{up}/v1/models")
    return up, upstream


async def _start(args: argparse.Namespace, tmp: Path, procs: list[Proc]) -> Targets:
    py = sys.executable
    up, upstream = await start_upstream(args.chunks, tmp, procs)
    chat = "/v1/chat/completions"
    targets = Targets({"direct": up + chat}, {"direct": upstream.cpu}, procs)

    if args.nginx:
        nginx = find_nginx()
        if nginx is None:
            print("nginx not found: no yardstick (apt-get install nginx-light)", file=sys.stderr)
        else:
            port = free_port()
            conf = tmp / "nginx.conf"
            conf.write_text(NGINX_CONF.format(tmp=tmp, upstream=up.rpartition(":")[2], port=port))
            argv = [nginx, "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c", str(conf)]
            proc = spawn("nginx", argv, tmp)
            procs.append(proc)
            await wait_ready(proc, f"http://127.0.0.1:{port}/v1/models")
            proc.pids = [proc.popen.pid, *children_of(proc.popen.pid)]  # master + worker
            targets.urls["nginx"] = f"http://127.0.0.1:{port}{chat}"
            targets.cpu["nginx"] = proc.cpu

    if not args.no_bare:
        port = free_port()
        argv = [py, str(HERE / "bare_proxy.py"), "--port", str(port), "--upstream", up]
        proc = spawn("aiohttp", argv, tmp)
        procs.append(proc)
        await wait_ready(proc, f"http://127.0.0.1:{port}/v1/models")
        targets.urls["aiohttp"] = f"http://127.0.0.1:{port}{chat}"
        targets.cpu["aiohttp"] = proc.cpu

    config = tmp / "gateway.toml"
    # A 429 is a breaker failure: with the default fail_max the breaker would open after 5
    # and later requests would skip the first provider without touching the network.
    config.write_text("[defaults]\nfail_max = 1000000\nmax_retries = 0\n")
    gw_argv = [py, "-m", "gateway"]
    if args.profile:
        gw_argv = [py, "-m", "cProfile", "-o", args.profile, "-m", "gateway"]
    level = args.gateway_log_level
    # name, first provider, command, log level, event loop, listen backlog, source tree
    src = Path(args.gateway_src) if args.gateway_src else ROOT
    gateways = [
        ("gateway", f"{up}/v1", gw_argv, level, "asyncio", 1024, src),
        ("failover", f"{up}/429/v1", [py, "-m", "gateway"], level, "asyncio", 1024, src),
    ]
    if args.baseline:
        # The same two routes from another commit's code, measured in the same rounds.
        old = Path(args.baseline)
        gateways.append(
            ("baseline", f"{up}/v1", [py, "-m", "gateway"], level, "asyncio", 1024, old)
        )
        gateways.append(
            ("fo-base", f"{up}/429/v1", [py, "-m", "gateway"], level, "asyncio", 1024, old)
        )
    if args.variants:
        warn = ("gw-warn", f"{up}/v1", [py, "-m", "gateway"], "WARNING", "asyncio", 1024, src)
        gateways.append(warn)
        if importlib.util.find_spec("uvloop") is not None:
            uv = ("gw-uvloop", f"{up}/v1", [py, "-m", "gateway"], level, "uvloop", 1024, src)
            gateways.append(uv)
        else:
            print("uvloop not installed: no gw-uvloop column (pip install uvloop)", file=sys.stderr)
        # aiohttp's default backlog, for the burst of new connections only
        gateways.append(("gw-b128", f"{up}/v1", [py, "-m", "gateway"], level, "asyncio", 128, src))
    for name, first, argv, log_level, loop_kind, backlog, cwd in gateways:
        port = free_port()
        env = gateway_env(port, first, f"{up}/v1", config, log_level, loop_kind, backlog)
        if cwd != ROOT:
            env["PYTHONPATH"] = str(cwd)  # before the editable install of the work tree
        proc = spawn(name, argv, tmp, env, cwd)
        procs.append(proc)
        await wait_ready(proc, f"http://127.0.0.1:{port}/healthz")
        targets.urls[name] = f"http://127.0.0.1:{port}{chat}"
        targets.cpu[name] = proc.cpu
    return targets


async def wait_quiet(targets: Targets, limit: float) -> None:
    """Wait up to ``limit`` seconds for other processes to leave the machine alone."""
    deadline = time.monotonic() + limit
    start = time.monotonic()
    while True:
        ours0, busy0, t0 = targets.ours(), machine_busy(), time.monotonic()
        await asyncio.sleep(1)
        other = ((machine_busy() - busy0) - (targets.ours() - ours0)) / (time.monotonic() - t0)
        waited = time.monotonic() - start
        if other <= NOISY:
            if waited > 1.5:
                print(f"    quiet after {waited:.0f}s", file=sys.stderr, flush=True)
            return
        if time.monotonic() > deadline:
            print(
                f"    still busy after {waited:.0f}s ({other:.2f} cores): measuring anyway",
                file=sys.stderr,
                flush=True,
            )
            return


async def _run(args: argparse.Namespace, tmp: Path, procs: list[Proc]) -> dict[str, Any]:
    targets = await _start(args, tmp, procs)
    targets.rounds, targets.retries = args.rounds, args.retry_noisy
    targets.quiet_wait = args.wait_quiet
    if args.wait_quiet > 0:
        await wait_quiet(targets, args.wait_quiet)
    names = [
        n for n in ("direct", "nginx", "aiohttp", "gateway", "baseline", "gw-warn", "gw-uvloop")
        if n in targets.urls
    ]  # fmt: skip
    n_req, n_stream, cap = args.requests, args.streams, args.time_cap
    plain = dict(CHAT)
    stream = {**CHAT, "stream": True, "bench_chunks": args.chunks}
    paced = {**stream, "bench_interval_ms": PACED_MS}

    fo = [n for n in ("gateway", "failover", "baseline", "fo-base") if n in targets.urls]
    print(f"warming up: {', '.join(dict.fromkeys([*names, *fo]))}", file=sys.stderr, flush=True)
    for name in dict.fromkeys([*names, *fo]):
        url = targets.urls[name]
        await measure(name, url, plain, n=0, concurrency=8, cap=cap, cpu=None, warm=400)
        await measure(name, url, stream, n=0, concurrency=8, cap=cap, cpu=None, warm=100)

    r: dict[str, dict[str, Result]] = {}
    r["ns1"] = await phase("non-streaming c=1", names, targets, plain, n_req, 1, cap)
    r["ns50"] = await phase("non-streaming c=50", names, targets, plain, 3 * n_req, 50, cap)
    r["st1"] = await phase("streaming c=1", names, targets, stream, n_stream, 1, cap)
    r["st50"] = await phase("streaming c=50", names, targets, stream, 4 * n_stream, 50, cap)
    r["pc50"] = await phase(
        f"paced {PACED_MS:g} ms c=50", names, targets, paced, max(50, n_stream // 2), 50, cap
    )
    r["fo1"] = await phase("failover c=1", fo, targets, plain, n_req, 1, cap)
    r["fo50"] = await phase("failover c=50", fo, targets, plain, 2 * n_req, 50, cap)
    r["fos1"] = await phase("failover streaming c=1", fo, targets, stream, n_stream, 1, cap)
    proxies = [n for n in names if n not in ("direct", "aiohttp")]
    opened = await open_streams_phase(proxies, targets, args.open_streams, cap)
    burst = await burst_phase(
        [n for n in (*proxies, "gw-b128") if n in targets.urls], targets, args.burst, cap
    )

    meta = {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "nginx": _nginx_version() if "nginx" in names else None,
        "gateway_commit": args.gateway_src or _git_commit(),
        "baseline": args.baseline,
        "chunks": args.chunks,
        "requests": n_req,
        "streams": n_stream,
        "gateway_log_level": args.gateway_log_level,
        "profiled": bool(args.profile),
    }
    report = render(r, names, meta, opened, burst)
    print(report)
    phases = {k: {t: v.summary() for t, v in d.items()} for k, d in r.items()}
    return {
        "meta": meta,
        "phases": phases,
        "open_streams": opened,
        "burst": burst,
        "report": report,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _nginx_version() -> str | None:
    nginx = find_nginx()
    if nginx is None:
        return None
    done = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
    return done.stderr.strip().removeprefix("nginx version: ")


def _git_commit() -> str:
    """The commit measured, '+changes' when gateway/ or breakers/ differ from it (read-only)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # git status must not touch the index
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT, capture_output=True, text=True, check=True, env=env,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "gateway", "breakers"],
            cwd=ROOT, capture_output=True, text=True, check=True, env=env,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


# -- report ---------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def signed(value: float | None, digits: int = 3) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:+.{digits}f}"


def verdict(value: float | None, limit: float) -> str:
    if value is None or math.isnan(value):
        return ""
    return "ok" if value <= limit else "MISSED"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [title, "-" * min(len(title), 100)]
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


Metric = Callable[[Result], float | None]


def render(
    r: dict[str, dict[str, Result]],
    names: list[str],
    meta: dict[str, Any],
    opened: dict[str, dict[str, float]],
    burst: dict[str, dict[str, float]],
) -> str:
    others = [n for n in names if n != "direct"]
    header = ["", *names, "target", ""]

    def row(
        label: str,
        key: str,
        metric: Metric,
        limit: float | None = None,
        digits: int = 3,
        added: bool = True,
    ) -> list[str]:
        """Each target's value; with ``added``, and the gateway's added value vs ``limit``."""
        results = r[key]
        base = metric(results["direct"])
        cells = [label, fmt(base, digits)]
        for name in others:
            value = metric(results[name])
            text = fmt(value, digits)
            if added and value is not None and base is not None:
                text += f" ({signed(value - base, digits)})"
            cells.append(text)
        gw, delta = metric(results["gateway"]), None
        if added and gw is not None and base is not None:
            delta = gw - base
        if limit is None:
            return [*cells, "", ""]
        check = delta if added else gw
        goal = f"added <= {limit:g}" if added else f"<= {limit:g}"
        return [*cells, goal, verdict(check, limit)]

    head = [
        f"Gateway benchmark: {meta['cpus']} CPUs ({meta['cpu_model']}), Python {meta['python']}, "
        f"aiohttp {meta['aiohttp']}" + (f", nginx {meta['nginx']}" if meta["nginx"] else ""),
        f"gateway at {meta['gateway_commit']}, log level {meta['gateway_log_level']} (to a file); "
        f"{meta['requests']} requests at c=1, x3 at c=50; {meta['streams']} streams at c=1, "
        f"x4 at c=50",
        "Columns: value, and in brackets what it adds to 'direct' (the fake upstream called "
        "without a proxy).",
    ]
    if meta.get("baseline"):
        head.append(f"'baseline': the gateway from {meta['baseline']}, in the same rounds.")
    if meta["profiled"]:
        head.append("THE GATEWAY RAN UNDER cProfile: its numbers are not representative.")

    ns = [
        row("c=1  latency p50 (ms)", "ns1", Result.p50, T_ADDED_P50_MS),
        row("c=1  latency p99 (ms)", "ns1", Result.p99, T_ADDED_P99_MS),
        row("c=1  throughput (req/s)", "ns1", Result.rate, digits=0, added=False),
        row("c=50 latency p50 (ms)", "ns50", Result.p50),
        row("c=50 latency p99 (ms)", "ns50", Result.p99),
        row("c=50 throughput (req/s)", "ns50", Result.rate, digits=0, added=False),
        row("c=1  CPU per request (ms) *", "ns1", Result.cpu_per_request_ms, added=False),
        row(
            "c=50 CPU per request (ms) *",
            "ns50",
            Result.cpu_per_request_ms,
            T_CPU_REQ_MS,
            added=False,
        ),
    ]
    events = r["st50"]["gateway"].events / max(1, r["st50"]["gateway"].ok)
    st = [
        row("c=1  TTFT p50 (ms)", "st1", Result.ttft50, T_TTFT_MS),
        row("c=1  TTFT p99 (ms)", "st1", Result.ttft99),
        row("c=1  whole stream p50 (ms)", "st1", Result.p50),
        row("c=1  chunks/s", "st1", Result.chunk_rate, digits=0, added=False),
        row("c=50 TTFT p50 (ms)", "st50", Result.ttft50),
        row("c=50 TTFT p99 (ms)", "st50", Result.ttft99),
        row("c=50 chunks/s", "st50", Result.chunk_rate, digits=0, added=False),
        row("c=50 CPU per stream (ms) *", "st50", Result.cpu_per_request_ms, added=False),
        row(
            "c=50 CPU per SSE event (us) *",
            "st50",
            Result.cpu_per_event_us,
            T_CPU_EVENT_US,
            digits=1,
            added=False,
        ),
        row("paced c=50 TTFT p50 (ms)", "pc50", Result.ttft50),
        row("paced c=50 TTFT p99 (ms)", "pc50", Result.ttft99),
        row("paced c=50 CPU per stream (ms) *", "pc50", Result.cpu_per_request_ms, added=False),
        row(
            "paced c=50 CPU per SSE event (us) *",
            "pc50",
            Result.cpu_per_event_us,
            T_CPU_EVENT_US,
            digits=1,
            added=False,
        ),
    ]
    marginal = []
    for key in ("st50", "pc50"):
        s, one = r[key]["gateway"], r["ns50"]["gateway"]
        a, b = s.cpu_per_request_ms(), one.cpu_per_request_ms()
        if a is not None and b is not None and s.ok and s.events:
            label = "back to back" if key == "st50" else "paced"
            marginal.append(f"{label} {(a - b) * 1000 / (s.events / s.ok):.1f} us")

    pairs = [("gateway", "failover")]
    if "baseline" in names:
        pairs.append(("baseline", "fo-base"))
    fo = []
    for label, key, metric, limit, digits in (
        ("c=1  latency p50 (ms)", "fo1", Result.p50, T_FAILOVER_MS, 3),
        ("c=1  latency p99 (ms)", "fo1", Result.p99, None, 3),
        ("c=1  CPU per request (ms) *", "fo1", Result.cpu_per_request_ms, None, 3),
        ("c=50 latency p50 (ms)", "fo50", Result.p50, None, 3),
        ("c=50 latency p99 (ms)", "fo50", Result.p99, None, 3),
        ("c=50 throughput (req/s)", "fo50", Result.rate, None, 0),
        ("c=50 CPU per request (ms) *", "fo50", Result.cpu_per_request_ms, None, 3),
        ("stream c=1 TTFT p50 (ms)", "fos1", Result.ttft50, None, 3),
    ):
        cells, deltas = [label], []
        for plain, moved in pairs:
            a, b = metric(r[key][plain]), metric(r[key][moved])
            deltas.append(b - a if a is not None and b is not None else None)
            cells += [fmt(a, digits), fmt(b, digits), signed(deltas[-1], digits)]
        goal = f"<= {limit:g}" if limit is not None else ""
        check = verdict(deltas[0], limit) if limit is not None else ""
        fo.append([*cells, goal, check])
    counts = ["answers with x-gateway-failover: true"]
    for plain, moved in pairs:
        a, b = r["fo1"][plain], r["fo1"][moved]
        counts += [f"{a.failovers}/{a.ok}", f"{b.failovers}/{b.ok}", ""]
    fo.append([*counts, "", ""])
    fo_header = ["", "plain", "429 -> next", "difference"]
    if len(pairs) > 1:
        fo_header += ["baseline plain", "429 -> next", "difference"]

    memory = [
        [
            name,
            f"{v['opened']:.0f}/{v['streams']:.0f}",
            fmt(v["rss_before_mb"], 1),
            fmt(v["rss_open_mb"], 1),
            fmt(v["kb_per_stream"], 1),
            fmt(v["rss_after_mb"], 1),
            "<= 100 MB" if name == "gateway" else "",
            verdict(v["rss_open_mb"], 100.0) if name == "gateway" else "",
        ]
        for name, v in opened.items()
    ]
    bursts = [
        [
            name,
            f"{v['ok']:.0f}/{v['connections']:.0f}",
            f"{v['listen_overflows']:.0f}",
            fmt(v["p50_ms"], 1),
            fmt(v["p90_ms"], 1),
            fmt(v["p99_ms"], 1),
        ]
        for name, v in burst.items()
    ]
    levels = []
    for key, label in (("ns50", "non-streaming c=50"), ("st50", "streaming c=50")):
        info, warn = r[key].get("gateway"), r[key].get("gw-warn")
        a = info.cpu_per_request_ms() if info else None
        b = warn.cpu_per_request_ms() if warn else None
        if a is not None and b:
            levels.append(f"{label} INFO {a:.3f} ms vs WARNING {b:.3f} ms ({(a / b - 1):+.0%})")

    out = [
        *head,
        "",
        table("Non-streaming POST /v1/chat/completions", header, ns),
        "",
        table(
            f"Streaming: {meta['chunks']} content chunks, ~{events:.0f} SSE events a stream; "
            f"paced = {PACED_MS:g} ms between chunks",
            header,
            st,
        ),
        "  gateway CPU per SSE event beyond a non-streaming request's CPU: "
        + (", ".join(marginal) or "-"),
        "",
        table(
            "Failover: plain route vs first provider answering 429 -> second provider",
            [*fo_header, "target", ""],
            fo,
        ),
        "",
        table(
            f"{next(iter(opened.values()))['streams']:.0f} slow streams open at once (10 s each)"
            if opened
            else "open streams: not measured",
            ["", "opened", "RSS before", "RSS open", "KB/stream", "RSS after", "target", ""],
            memory,
        ),
        "",
        table(
            f"A burst of {next(iter(burst.values()))['connections']:.0f} new connections at once"
            if burst
            else "burst: not measured",
            ["", "ok", "ListenOverflows", "p50 (ms)", "p90 (ms)", "p99 (ms)"],
            bursts,
        ),
        "",
        "CPU per request, log level INFO vs WARNING (goal: under 5 % apart): "
        + ("; ".join(levels) or "-"),
        "",
        "* CPU: utime+stime of the process under test (nginx: master and worker) from "
        f"/proc/PID/stat over the measured\n  phase, {1000 / CLK_TCK:g} ms ticks; in the "
        "'direct' column it is the fake upstream's own CPU.",
    ]
    errors = [
        f"{k}/{t}: {v.errors} errors, first: {v.first_error}"
        for k, d in r.items()
        for t, v in d.items()
        if v.errors
    ]
    capped = [f"{k}/{t}" for k, d in r.items() for t, v in d.items() if v.timed_out]
    noisy = [
        f"{k}/{t} {v.others:.2f}" for k, d in r.items() for t, v in d.items() if v.others > NOISY
    ]
    worst = max((v.others for d in r.values() for v in d.values()), default=0.0)
    out.append(
        f"Other processes on this machine used at most {worst:.2f} cores during a phase"
        + (f"; NOISY phases (cores): {', '.join(noisy)}" if noisy else " (a quiet machine).")
    )
    if errors:
        out.append("ERRORS: " + "; ".join(errors))
    if capped:
        out.append("time cap reached (fewer requests than asked): " + ", ".join(capped))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Benchmark the gateway against its fake upstream, on loopback"
    )
    parser.add_argument(
        "--requests", type=int, default=4000,
        help="non-streaming requests per target at c=1 (x3 at c=50; default 4000)",
    )  # fmt: skip
    parser.add_argument(
        "--streams", type=int, default=400,
        help="streams per target at c=1 (x4 at c=50, /2 paced; default 400)",
    )  # fmt: skip
    parser.add_argument("--chunks", type=int, default=50, help="content chunks a stream (50)")
    parser.add_argument(
        "--time-cap", type=float, default=30.0,
        help="seconds after which a phase starts no new request (default 30)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=4,
        help="split each phase into rounds that take the targets in turn (default 4)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1/5 of the requests")
    parser.add_argument("--nginx", action="store_true", help="add a plain nginx reverse proxy")
    parser.add_argument(
        "--no-bare", action="store_true", help="leave out the bare aiohttp pass-through"
    )
    parser.add_argument(
        "--gateway-log-level", default="INFO",
        help="GATEWAY_LOG_LEVEL of the gateways (default INFO: one line a request, to a file)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", metavar="FILE", help="run the gateway under cProfile, stats to FILE"
    )
    parser.add_argument(
        "--wait-quiet", type=float, default=0.0, metavar="SECONDS",
        help="first wait up to SECONDS for other processes to stop using the CPU "
        "(with --retry-noisy: before every attempt too)",
    )  # fmt: skip
    parser.add_argument(
        "--retry-noisy", type=int, default=0, metavar="N",
        help="repeat a measurement up to N times while other processes disturb it; "
        "the least disturbed attempt counts (default 0)",
    )  # fmt: skip
    parser.add_argument(
        "--gateway-src", metavar="DIR",
        help="run the gateways from DIR instead of this work tree, e.g. to compare a commit: "
        "git archive COMMIT gateway breakers | tar -x -C DIR",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", metavar="DIR",
        help="also run the gateway from DIR (another commit: git archive COMMIT gateway "
        "breakers | tar -x -C DIR) as 'baseline', in the same rounds",
    )  # fmt: skip
    parser.add_argument(
        "--no-variants", dest="variants", action="store_false",
        help="leave out the gateway at WARNING, under uvloop and with a 128 backlog",
    )  # fmt: skip
    parser.add_argument(
        "--open-streams", type=int, default=1000,
        help="slow streams held open at once for the memory phase (default 1000)",
    )  # fmt: skip
    parser.add_argument(
        "--burst", type=int, default=1000,
        help="new connections opened at once for the listen-queue phase (default 1000)",
    )  # fmt: skip
    parser.add_argument("--json", metavar="FILE", help="also write every number as JSON")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests = max(100, args.requests // 5)
        args.streams = max(50, args.streams // 5)
        args.time_cap = min(args.time_cap, 10.0)
    if args.profile:
        args.profile = os.path.abspath(args.profile)
    for option in ("gateway_src", "baseline"):
        tree = getattr(args, option)
        if tree:
            setattr(args, option, os.path.abspath(tree))
            if not os.path.isfile(os.path.join(tree, "gateway", "__main__.py")):
                flag = "--" + option.replace("_", "-")
                parser.error(f"{flag}: no gateway/__main__.py in {tree}")
    if min(args.requests, args.streams, args.chunks, args.rounds) < 1 or args.time_cap <= 0:
        parser.error("--requests, --streams, --chunks, --rounds and --time-cap must be positive")
    raise_fd_limit()
    try:
        data = asyncio.run(run(args))
    except asyncio.CancelledError:
        print("interrupted: every process the benchmark started is stopped", file=sys.stderr)
        sys.exit(130)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2, default=str))


if __name__ == "__main__":
    main()
