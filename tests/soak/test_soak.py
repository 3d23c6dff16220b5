"""A bounded soak: hundreds of concurrent clients against providers that fail at random.

Three fake providers (:class:`ChaosUpstream`) answer each request with a behaviour drawn
from a seeded random table: normal answers, 429 with and without ``Retry-After``,
``insufficient_quota``, 500/502/503/529, hang-ups, silence, slow first tokens, streams
cut or stalled after N tokens, a missing ``[DONE]``, malformed chunks, error events in a
200 stream, cut and non-JSON bodies. A fixed count of requests (streaming, non-streaming
and embeddings) goes through the gateway from ``concurrency`` clients at once, in two
halves, under a hard time cap.

Invariants (see :meth:`SoakReport.problems`):

* every request ends in a complete answer (a ``chat.completion`` with the whole text; a
  stream with the whole text, a ``finish_reason`` and a final ``data: [DONE]``) or a
  clean OpenAI-style error (a 4xx/5xx other than 500 with ``{"error": {message, type,
  param, code}}``; or, for a committed stream, exactly one final error event and no
  ``[DONE]``); nothing hangs past the gateway's deadline, nothing truncated is
  presented as complete;
* nothing of a failed attempt reaches the client: a stream carries one role delta, and
  its text is the whole answer (complete) or a prefix of it (ended by an error event);
* no connection, task or file descriptor is left behind. After each half, with the
  gateway and the fakes still up, the load clients' session is closed, the keep-alive
  connections left in the gateway's pools are counted and closed from the fakes' side,
  and then the fds and asyncio tasks must be exactly what they were before the first
  request; after everything is shut down they must be what they were before start;
* memory is stable: from the end of the first half to the end of the second (both
  measured in that same quiet state) Python's allocated blocks grow by less than
  :data:`MAX_SECOND_HALF_BLOCKS` (objects a leak would keep) and RSS by less than
  :data:`MAX_SECOND_HALF_GROWTH` (a looser bound: the hostile upstreams' multi-megabyte
  bodies and inflating bombs leave the allocator's heap fragmented by a few MiB either way);
* the gateway logs no error (an ``unexpected error`` would mean a 500).

``bench/soak.py`` runs :func:`run_soak` with a larger budget by hand.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.config import Settings
from gateway.server import PROVIDERS, create_app
from gateway.sse import SSEParser
from tests import fake_upstream as fu
from tests.conftest import PROVIDER_KEY, provider_configs
from tests.fake_upstream import FakeUpstream

SEED = 20240607
CI_REQUESTS = 3000
CI_CONCURRENCY = 300
CI_TIME_CAP = 60.0  # seconds, for the whole run; it normally takes 5-10
REQUEST_TIMEOUT = 5.0  # the gateway's per-request deadline
CLIENT_MARGIN = 3.0  # a client gives up (and counts a hang) this long after the deadline
UPSTREAM_TIMEOUT = 0.5  # first token, whole response, idle between chunks
MAX_SECOND_HALF_GROWTH = 48 * 1024 * 1024  # bytes of RSS
MAX_SECOND_HALF_BLOCKS = 5000  # of about 300,000: 1,500 requests that each kept an object exceed it
EXPECTED_TEXT = "".join(fu.WORDS)
ERROR_KEYS = {"message", "type", "param", "code"}
FAKE_FILES = (os.path.join("tests", "fake_upstream.py"), os.path.join("soak", "test_soak.py"))

Make = Callable[[random.Random], fu.Behaviour]


def _chunks(words: list[str]) -> bytes:
    return b"".join(fu.chunk(w) for w in words)


_END = fu.chunk(finish="stop") + b"data: [DONE]\n\n"
_ERROR_EVENT = (
    b'data: {"error": {"message": "The server is overloaded", "type": "server_error",'
    b' "param": null, "code": null}}\n\n'
)
_HALF = len(fu.WORDS) // 2
_ELSEWHERE = "http://127.0.0.1:9/v1/chat/completions"  # never followed


def _absurd_retry_after() -> fu.Behaviour:
    behaviour = fu.rate_limited()
    behaviour.headers = {"Retry-After": "inf"}
    return behaviour


# name, weight, behaviour. "ok*" entries are the healthy answers; everything else a fault.
STREAM_TABLE: list[tuple[str, float, Make]] = [
    ("ok", 48, lambda r: fu.ok()),
    ("ok_paced", 4, lambda r: fu.stream(chunk_delay=0.01)),
    ("slow_first_token", 4, lambda r: fu.stream(delay=r.uniform(0.05, 0.25))),
    ("rate_limited", 4, lambda r: fu.rate_limited()),
    ("rate_limited_retry_after", 3, lambda r: fu.rate_limited(r.choice((0, 0.05, 0.3)))),
    ("insufficient_quota", 1, lambda r: fu.insufficient_quota()),
    ("server_error", 6, lambda r: fu.server_error(r.choice((500, 502, 503, 529)))),
    ("hang_up", 3, lambda r: fu.hang_up()),
    ("silent", 2, lambda r: fu.silent()),
    ("cut", 4, lambda r: fu.drop_after(r.randint(0, len(fu.WORDS) - 1))),
    ("stall", 2, lambda r: fu.stall_after(r.randint(0, len(fu.WORDS) - 1))),
    ("missing_done", 3, lambda r: fu.stream(done=False)),
    ("no_finish", 1, lambda r: fu.stream(done=False, finish=False)),
    (
        "malformed_chunk",
        3,
        lambda r: fu.sse(
            _chunks(fu.WORDS[:_HALF]) + b"data: {broken\n\n" + _chunks(fu.WORDS[_HALF:]) + _END
        ),
    ),
    ("malformed_first", 2, lambda r: fu.sse(b"data: {broken\n\n" + _chunks(fu.WORDS) + _END)),
    ("error_event_first", 2, lambda r: fu.sse(_ERROR_EVENT)),
    ("error_event_mid", 2, lambda r: fu.sse(_chunks(fu.WORDS[:_HALF]) + _ERROR_EVENT)),
    # Hostile upstreams: nothing they send may reach further than it should.
    ("endless_html", 1, lambda r: fu.endless(200, "text/html")),
    ("gzip_bomb", 1, lambda r: fu.bomb(64 << 20)),
    ("redirect", 1, lambda r: fu.redirect(307, _ELSEWHERE)),
    ("echo_key_event", 1, lambda r: fu.echo_key_event()),
    ("absurd_retry_after", 1, lambda r: _absurd_retry_after()),
]
PLAIN_TABLE: list[tuple[str, float, Make]] = [
    ("ok", 52, lambda r: fu.ok()),
    ("slow", 5, lambda r: fu.ok(delay=r.uniform(0.05, 0.25))),
    ("rate_limited", 4, lambda r: fu.rate_limited()),
    ("rate_limited_retry_after", 3, lambda r: fu.rate_limited(r.choice((0, 0.05, 0.3)))),
    ("insufficient_quota", 1, lambda r: fu.insufficient_quota()),
    ("server_error", 6, lambda r: fu.server_error(r.choice((500, 502, 503, 529)))),
    ("hang_up", 3, lambda r: fu.hang_up()),
    ("silent", 2, lambda r: fu.silent()),
    ("cut_body", 3, lambda r: fu.wrong_length()),
    ("not_json", 2, lambda r: fu.Behaviour("not_json")),
    ("error_in_200", 2, lambda r: fu.Behaviour("error_in_200")),
    ("endless_500", 1, lambda r: fu.endless(500, "text/html")),
    ("endless_json", 1, lambda r: fu.endless(200)),
    ("gzip_bomb", 1, lambda r: fu.bomb(64 << 20)),
    ("error_page", 1, lambda r: fu.error_page(4 << 20)),
    ("redirect", 1, lambda r: fu.redirect(302, _ELSEWHERE)),
    ("echo_key", 1, lambda r: fu.echo_key(r.choice((400, 401)))),
    ("absurd_retry_after", 1, lambda r: _absurd_retry_after()),
    ("negative_usage", 1, lambda r: fu.ok(usage={"prompt_tokens": -5, "completion_tokens": "x"})),
]


class ChaosUpstream(FakeUpstream):
    """A fake provider that draws each answer from a seeded random table.

    Adds two non-streaming faults to :class:`FakeUpstream`'s: ``not_json`` (a 200 HTML
    page) and ``error_in_200`` (a 200 whose JSON body is an error). Counts what it played and the requests in progress.
    """

    def __init__(self, name: str, seed: int) -> None:
        super().__init__(name)
        self.rng = random.Random(seed)
        self.default = fu.Behaviour("chaos")
        self.played: Counter[str] = Counter()
        self.active = 0  # requests whose handler has not returned

    def _pick(self, streaming: bool) -> tuple[str, fu.Behaviour]:
        table = STREAM_TABLE if streaming else PLAIN_TABLE
        name, _, make = self.rng.choices(table, weights=[w for _, w, _ in table])[0]
        return name, make(self.rng)

    async def _answer(
        self, request: web.Request, body: dict[str, Any], b: fu.Behaviour
    ) -> web.StreamResponse:
        self.active += 1
        try:
            if b.kind == "chaos":
                name, b = self._pick(bool(body.get("stream")))
                self.played[name] += 1
            if b.kind == "not_json":
                return web.Response(body=b"<html>502 Bad Gateway</html>", content_type="text/html")
            if b.kind == "error_in_200":
                return web.Response(body=_ERROR_EVENT[6:-2], content_type="application/json")
            return await super()._answer(request, body, b)
        finally:
            self.active -= 1

    def close_idle(self) -> None:
        """Close every connection from the server side (call it only when idle)."""
        assert self._runner is not None and self._runner.server is not None
        for handler in self._runner.server.connections:
            handler.force_close()

    def forget(self) -> None:
        """Drop the recorded request bodies and headers (they grow with the run)."""
        self.requests.clear()
        self.headers.clear()


class Violation(Exception):
    """A request whose ending breaks an invariant."""


@dataclass
class Snapshot:
    """Resources of this process at one moment."""

    fds: int
    tasks: int
    rss: int  # bytes
    blocks: int  # sys.getallocatedblocks()
    peak: int = 0  # bytes, the process's peak RSS so far (VmHWM)


@dataclass
class SoakReport:
    """What a soak run did and measured."""

    requests: int
    concurrency: int
    seed: int
    elapsed: float = 0.0
    finished: int = 0  # requests that ended (well or not)
    slowest: float = 0.0  # seconds, the longest a request took to end
    outcomes: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    played: Counter[str] = field(default_factory=Counter)
    upstream_calls: int = 0
    upstream_faults: int = 0
    failover_warnings: int = 0
    gateway_errors: list[str] = field(default_factory=list)
    fake_write_errors: int = 0  # a fake wrote after the gateway hung up on it (expected)
    time_cap_hit: bool = False
    busy_after: str = ""  # gateway or fake bookkeeping not back to idle at a checkpoint
    # At the end of each half, with the gateway and the fakes still up: keep-alive
    # connections found in the gateway's pools (then closed), and (fds, tasks) left over
    # against the start once no connection is left.
    pooled_connections: list[int] = field(default_factory=list)
    leaks: list[tuple[int, int]] = field(default_factory=list)
    # (fds, tasks) left over after closing everything, against the count before start.
    leaks_closed: tuple[int, int] | None = None
    memory: list[Snapshot] = field(default_factory=list)  # start, half 1, half 2

    @property
    def fault_rate(self) -> float:
        """Share of upstream calls that got a faulty answer."""
        return self.upstream_faults / self.upstream_calls if self.upstream_calls else 0.0

    @property
    def second_half_growth(self) -> int:
        """RSS growth over the second half, in bytes."""
        if len(self.memory) < 3:
            return 0
        return self.memory[2].rss - self.memory[1].rss

    def problems(self) -> list[str]:
        """Every broken invariant, in words; empty when the run is good."""
        out = []
        if self.time_cap_hit:
            out.append(f"time cap hit: {self.finished} of {self.requests} requests finished")
        if self.finished != self.requests:
            out.append(f"{self.requests - self.finished} request(s) never finished")
        if self.lost:
            out.append(f"{len(self.lost)} request(s) lost: " + "; ".join(self.lost[:10]))
        if self.gateway_errors:
            out.append("gateway logged errors: " + "; ".join(self.gateway_errors[:5]))
        if self.busy_after:
            out.append("not idle after a half: " + self.busy_after)
        for n, (fds, tasks) in enumerate(self.leaks, 1):
            if fds or tasks:
                out.append(f"after half {n}: {fds} fd(s) and {tasks} task(s) left over")
        if len(self.leaks) != 2:
            out.append("the leak checks did not run")
        if self.leaks_closed != (0, 0):
            out.append(f"after closing everything, (fds, tasks) left over: {self.leaks_closed}")
        if self.second_half_growth >= MAX_SECOND_HALF_GROWTH:
            out.append(f"RSS grew {self.second_half_growth / 2**20:.1f} MiB in the second half")
        if len(self.memory) > 2:
            blocks = self.memory[2].blocks - self.memory[1].blocks
            if blocks >= MAX_SECOND_HALF_BLOCKS:
                out.append(f"{blocks} more allocated blocks after the second half")
        return out

    def summary(self) -> str:
        """The figures, one per line."""
        mib = 2**20
        mem = ";  ".join(
            f"{label} rss {s.rss / mib:.1f} MiB, {s.blocks} blocks"
            for label, s in zip(("start", "half 1", "half 2"), self.memory, strict=False)
        )
        ended = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        faults = ", ".join(f"{k} {v}" for k, v in self.played.most_common())
        return "\n".join(
            [
                f"soak: {self.requests} requests, concurrency {self.concurrency}, "
                f"seed {self.seed}, {self.elapsed:.1f}s",
                f"  ended: {ended}",
                f"  requests lost: {len(self.lost)}; slowest request {self.slowest:.2f}s "
                f"(gateway deadline {REQUEST_TIMEOUT:g}s)",
                f"  upstream calls {self.upstream_calls}, faulty {self.upstream_faults} "
                f"(fault rate {self.fault_rate:.0%}); failover warnings {self.failover_warnings}",
                f"  played: {faults}",
                f"  gateway errors logged: {len(self.gateway_errors)}; fake upstream writes "
                f"after the gateway hung up: {self.fake_write_errors}",
                f"  keep-alive connections pooled after each half: {self.pooled_connections}",
                f"  leaked (fds, tasks) after each half: {self.leaks}; "
                f"after closing everything: {self.leaks_closed}",
                f"  memory: {mem}",
                f"  second-half RSS growth: {self.second_half_growth / mib:+.2f} MiB",
                f"  peak RSS of the process (gateway, fakes and clients): "
                f"{max((m.peak for m in self.memory), default=0) / mib:.1f} MiB",
            ]
        )

    def figures(self) -> dict[str, Any]:
        """The headline figures (for junit properties)."""
        mib = 2**20
        return {
            "requests": self.requests,
            "concurrency": self.concurrency,
            "fault_rate": round(self.fault_rate, 3),
            "requests_lost": len(self.lost),
            "leaked_fds": sum(fds for fds, _ in self.leaks),
            "leaked_tasks": sum(tasks for _, tasks in self.leaks),
            "leaked_closed": str(self.leaks_closed),
            "rss_half1_mib": round(self.memory[1].rss / mib, 1) if len(self.memory) > 1 else None,
            "rss_half2_mib": round(self.memory[2].rss / mib, 1) if len(self.memory) > 2 else None,
            "peak_rss_mib": round(max((m.peak for m in self.memory), default=0) / mib, 1),
        }


# -- measuring ---------------------------------------------------------------------


def snapshot() -> Snapshot:
    """Open fds, asyncio tasks, RSS and allocated blocks, now."""
    rss = peak = 0
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return Snapshot(
        len(os.listdir("/proc/self/fd")),
        len(asyncio.all_tasks()),
        rss,
        sys.getallocatedblocks(),
        peak,
    )


def _socket_inodes() -> set[str]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def tcp_connections(ports: set[int]) -> tuple[int, int]:
    """This process's established TCP connections to ``ports`` (client ends) and on
    ``ports`` (server ends)."""
    mine = _socket_inodes()
    client = server = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] != "01" or cols[9] not in mine:  # 01: ESTABLISHED
                continue
            local = int(cols[1].rsplit(":", 1)[1], 16)
            remote = int(cols[2].rsplit(":", 1)[1], 16)
            client += remote in ports
            server += local in ports
    return client, server


async def settle(cond: Callable[[], bool], within: float = 5.0) -> bool:
    """Poll (bounded) until ``cond()`` holds; its final value."""
    for _ in range(int(within / 0.02)):
        if cond():
            return True
        await asyncio.sleep(0.02)
    return cond()


class _LogCounter(logging.Handler):
    """Counts the gateway's warnings and keeps its errors, instead of printing them.

    ``aiohttp.server`` serves both the gateway and the fakes: an error raised in a fake's
    handler (writing to a connection the gateway has closed, as it should on a timeout)
    is counted apart.
    """

    def __init__(self, report: SoakReport) -> None:
        super().__init__(logging.WARNING)
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            if _raised_in_fake(record):
                self.report.fake_write_errors += 1
            else:
                self.report.gateway_errors.append(f"{record.name}: {_describe(record)}")
        elif "failing over" in record.getMessage():
            self.report.failover_warnings += 1


def _raised_in_fake(record: logging.LogRecord) -> bool:
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(FAKE_FILES):
            return True
        tb = tb.tb_next
    return False


def _describe(record: logging.LogRecord) -> str:
    text = record.getMessage()[:200]
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        text += f" ({type(exc).__name__}: {str(exc)[:200]})"
    return text


# -- one request ---------------------------------------------------------------------


def _body(kind: str, i: int) -> dict[str, Any]:
    if kind == "embeddings":
        return {"model": "text-embedding-3-small", "input": f"soak {i}"}
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"soak request {i}"}],
        "stream": kind == "stream",
    }


def _check_error(status: int, headers: Any, payload: bytes) -> str:
    if status == 500 or not 400 <= status < 600:
        raise Violation(f"status {status}: {payload[:200]!r}")
    try:
        err = orjson.loads(payload)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise Violation(
            f"status {status} without an OpenAI error body: {payload[:200]!r}"
        ) from None
    if not isinstance(err, dict) or set(err) != ERROR_KEYS or b"Traceback" in payload:
        raise Violation(f"status {status} with a malformed error: {payload[:200]!r}")
    if status in (429, 503) and not headers.get("Retry-After", "").isdigit():
        raise Violation(f"status {status} without a Retry-After")
    return f"error {status} {err['code']}"


def _check_stream(payload: bytes) -> str:
    parser = SSEParser()
    events = parser.feed(payload) + parser.finish()
    if parser.pending():
        raise Violation(f"stream ends inside an event: {parser.pending()[:100]!r}")
    datas: list[Any] = []
    for event in events:
        if event.data is None:
            continue
        if event.data == b"[DONE]":
            datas.append("[DONE]")
            continue
        try:
            datas.append(orjson.loads(event.data))
        except orjson.JSONDecodeError:
            raise Violation(
                f"invalid JSON event reached the client: {event.data[:100]!r}"
            ) from None
    errors = [d for d in datas if isinstance(d, dict) and "error" in d]
    text = "".join(
        (c.get("delta") or {}).get("content") or ""
        for d in datas
        if isinstance(d, dict)
        for c in d.get("choices") or ()
    )
    roles = sum(
        1
        for d in datas
        if isinstance(d, dict)
        for c in d.get("choices") or ()
        if (c.get("delta") or {}).get("role")
    )
    if roles > 1:
        raise Violation(f"{roles} role deltas: events of a failed attempt leaked")
    if not EXPECTED_TEXT.startswith(text):
        raise Violation(f"stream text {text!r} is not (a prefix of) the answer")
    if "[DONE]" in datas:
        if datas.count("[DONE]") != 1 or datas[-1] != "[DONE]":
            raise Violation("[DONE] is not the single last event")
        if errors:
            raise Violation("a stream with both [DONE] and an error event")
        if text != EXPECTED_TEXT:
            raise Violation(f"stream presented as complete with text {text!r}")
        if not any(c.get("finish_reason") for d in datas[:-1] for c in d.get("choices") or ()):
            raise Violation("stream presented as complete without a finish_reason")
        return "stream complete"
    if len(errors) != 1 or datas[-1] is not errors[0]:
        raise Violation(f"stream without [DONE] nor one final error event: {payload[-200:]!r}")
    if set(errors[0]["error"]) != ERROR_KEYS:
        raise Violation(f"malformed error event: {errors[0]!r}")
    return "stream error event"


def judge(kind: str, status: int, headers: Any, payload: bytes, request_id: str) -> str:
    """The category of one ended request; raises :class:`Violation` when it breaks a rule."""
    if PROVIDER_KEY.encode() in payload:
        raise Violation("the provider's key reached the client")
    if headers.get("x-request-id") != request_id:
        raise Violation(f"x-request-id {headers.get('x-request-id')!r} != {request_id!r}")
    if status != 200:
        return _check_error(status, headers, payload)
    if kind == "stream":
        if not headers.get("Content-Type", "").startswith("text/event-stream"):
            raise Violation(f"stream answered as {headers.get('Content-Type')!r}")
        return _check_stream(payload)
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise Violation(f"200 with a body that is not JSON: {payload[:200]!r}") from None
    if kind == "embeddings":
        if body.get("object") != "list" or not body.get("data"):
            raise Violation(f"not an embeddings list: {payload[:200]!r}")
        return "embeddings complete"
    if body.get("object") != "chat.completion":
        raise Violation(f"not a chat.completion: {payload[:200]!r}")
    if body["choices"][0]["message"]["content"] != EXPECTED_TEXT:
        raise Violation(f"incomplete completion: {payload[:200]!r}")
    return "complete"


async def one_request(session: aiohttp.ClientSession, base: str, i: int, kind: str) -> str:
    """Send request ``i`` and judge how it ended."""
    path = "/v1/embeddings" if kind == "embeddings" else "/v1/chat/completions"
    request_id = f"soak-{i}"
    limit = REQUEST_TIMEOUT + CLIENT_MARGIN
    try:
        async with asyncio.timeout(limit):
            async with session.post(
                base + path,
                data=orjson.dumps(_body(kind, i)),
                headers={"Content-Type": "application/json", "x-request-id": request_id},
            ) as resp:
                payload = await resp.read()
    except TimeoutError:
        raise Violation(f"no complete answer within {limit:g}s (hang)") from None
    except aiohttp.ClientError as e:
        raise Violation(f"transport error {type(e).__name__}: {e}") from None
    return judge(kind, resp.status, resp.headers, payload, request_id)


def request_kinds(count: int, seed: int) -> list[str]:
    """The seeded mix: 45% streams, 45% non-streaming chats, 10% embeddings."""
    rng = random.Random(seed)
    kinds = []
    for _ in range(count):
        x = rng.random()
        kinds.append("stream" if x < 0.45 else "chat" if x < 0.9 else "embeddings")
    return kinds


async def drive(
    session: aiohttp.ClientSession,
    base: str,
    work: Iterator[tuple[int, str]],
    concurrency: int,
    report: SoakReport,
) -> None:
    """``concurrency`` clients take requests from ``work`` until it is empty."""

    async def client() -> None:
        for i, kind in work:  # a shared iterator: each request is taken once
            t0 = time.perf_counter()
            try:
                report.outcomes[await one_request(session, base, i, kind)] += 1
            except Violation as e:
                report.lost.append(f"#{i} {kind}: {e}")
            report.slowest = max(report.slowest, time.perf_counter() - t0)
            report.finished += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))


# -- the run ---------------------------------------------------------------------------


def _raise_fd_limit(needed: int) -> tuple[int, int] | None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return soft, hard


def _busy(app: web.Application, fakes: list[ChaosUpstream]) -> str:
    parts = []
    for p in app[PROVIDERS].values():
        if p.inflight or p.limiter.in_use or p.limiter.queued:
            parts.append(f"{p.name} in flight {p.inflight}, slots {p.limiter.in_use}")
    parts += [f"fake {f.name} active {f.active}" for f in fakes if f.active]
    return "; ".join(parts)


async def _quiesce(
    app: web.Application, fakes: list[ChaosUpstream], port: int, report: SoakReport
) -> Snapshot:
    """Wait for the gateway and the fakes to go idle, close the keep-alive connections
    left in the gateway's pools (from the fakes' side), and measure.

    The load clients' session is already closed, so no connection is left at all: the
    fds and tasks must be back at their count before the first request, and the memory
    of two checkpoints compares like with like (no pool grown larger in one of them).
    """
    idle = await settle(lambda: not _busy(app, fakes))
    if not idle:
        report.busy_after += f"[{_busy(app, fakes)}]"
    fake_ports = {f.port for f in fakes}
    report.pooled_connections.append(tcp_connections(fake_ports)[0])
    for f in fakes:
        f.close_idle()
    ports = fake_ports | {port}
    await settle(lambda: tcp_connections(ports) == (0, 0))
    for f in fakes:
        f.forget()
    await asyncio.sleep(0.05)
    gc.collect()
    return snapshot()


async def run_soak(
    requests: int = CI_REQUESTS,
    concurrency: int = CI_CONCURRENCY,
    seed: int = SEED,
    time_cap: float = CI_TIME_CAP,
) -> SoakReport:
    """Run the soak and measure it; check the result with :meth:`SoakReport.problems`."""
    report = SoakReport(requests, concurrency, seed)
    counter = _LogCounter(report)
    quiet = [logging.getLogger(n) for n in ("gateway", "breakers", "aiohttp.server")]
    saved = [(lg, lg.propagate) for lg in quiet]
    for lg in quiet:
        lg.addHandler(counter)
        lg.propagate = False
    old_limit = _raise_fd_limit(4 * concurrency + 256)
    try:
        await _run(report, time_cap)
    finally:
        for lg, propagate in saved:
            lg.removeHandler(counter)
            lg.propagate = propagate
        if old_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, old_limit)
    report.upstream_calls = sum(report.played.values())
    report.upstream_faults = sum(n for f, n in report.played.items() if not f.startswith("ok"))
    return report


async def _run(report: SoakReport, time_cap: float) -> None:
    gc.collect()
    before = snapshot()
    fakes = [ChaosUpstream(name, report.seed + n) for n, name in enumerate(("a", "b", "c"))]
    for f in fakes:
        await f.start()
    settings = Settings(
        providers=provider_configs(
            *fakes,
            first_token_timeout=UPSTREAM_TIMEOUT,
            response_timeout=UPSTREAM_TIMEOUT,
            idle_timeout=UPSTREAM_TIMEOUT,
            reset_timeout=0.3,
            quota_reset_timeout=1.0,
        ),
        request_timeout=REQUEST_TIMEOUT,
        max_response_bytes=1 << 20,  # the endless and inflating bodies stop here
    )
    app = create_app(settings, probes=False)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}"
        await asyncio.sleep(0.05)
        gc.collect()
        report.memory.append(start := snapshot())
        kinds = request_kinds(report.requests, report.seed)
        half = report.requests // 2
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(time_cap):
                for lo, hi in ((0, half), (half, report.requests)):
                    work = iter([(i, kinds[i]) for i in range(lo, hi)])
                    async with aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=report.concurrency),
                        timeout=aiohttp.ClientTimeout(total=None),
                    ) as session:
                        await drive(session, base, work, min(report.concurrency, hi - lo), report)
                    report.elapsed = time.perf_counter() - t0
                    snap = await _quiesce(app, fakes, port, report)
                    report.memory.append(snap)
                    report.leaks.append((snap.fds - start.fds, snap.tasks - start.tasks))
        except TimeoutError:
            report.time_cap_hit = True
        report.elapsed = time.perf_counter() - t0
    finally:
        await runner.cleanup()
        for f in fakes:
            await f.stop()
        report.played = sum((f.played for f in fakes), Counter())

    # Leaks after closing everything, against the count before anything started.
    def closed_counts() -> tuple[int, int]:
        s = snapshot()
        return s.fds - before.fds, s.tasks - before.tasks

    await settle(lambda: closed_counts() == (0, 0), within=2.0)
    gc.collect()
    report.leaks_closed = closed_counts()


@pytest.mark.soak
async def test_soak(record_property: Callable[[str, object], None]) -> None:
    report = await run_soak()
    print()
    print(report.summary())
    for name, value in report.figures().items():
        record_property(name, value)
    assert report.problems() == [], report.summary()
    assert sum(report.outcomes.values()) + len(report.lost) == report.requests
    assert report.upstream_faults > 0 and report.outcomes["stream complete"] > 0
