"""``--workers N``: N gateway processes on one port, under a supervisor.

Each worker is ``python -m gateway`` with its own listening socket on the same address
and port (``SO_REUSEPORT``: the kernel spreads new connections over them) and its own
event loop, so the gateway uses every core. The supervisor

* holds the port (bound, not listening) so that no other program takes it while a
  worker restarts, and reports a port it cannot have as one line, before any worker runs;
* runs the workers' hub (:mod:`gateway.hub`) when no Redis is configured, so that they
  share provider state: one probe per provider per interval, one half-open trial, every
  failure counted once for all;
* sets up prometheus-client's multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``, a
  fresh temporary one unless given, cleared at start), so that ``/metrics`` on any worker
  sums them all; a dead worker's live gauges are removed;
* restarts a worker that dies, logging why (one that dies within
  :data:`_QUICK_DEATH` seconds of its start waits longer each time, up to
  :data:`_MAX_BACKOFF`, so a crash loop does not spin);
* on SIGTERM or SIGINT passes SIGTERM to every worker, which drains as a single process
  does (``shutdown_grace``), waits for them, and exits 0.

A worker notices when its supervisor is gone (killed with SIGKILL) and drains too.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

from prometheus_client.multiprocess import mark_process_dead

from gateway.config import Settings
from gateway.hub import Hub
from gateway.sharing import Worker

log = logging.getLogger("gateway")

#: Set by the supervisor for its workers (internal): the worker's index, the hub's
#: socket, and whether it replaces one that died.
INDEX_ENV = "GATEWAY_WORKER_INDEX"
HUB_ENV = "GATEWAY_HUB"
RESTARTED_ENV = "GATEWAY_WORKER_RESTARTED"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_QUICK_DEATH = 5.0  # a worker that dies sooner than this after starting is crashing
_MAX_BACKOFF = 10.0
_KILL_AFTER = 10.0  # seconds past shutdown_grace before a worker that will not stop is killed
_WATCH_PARENT = 1.0  # how often a worker checks that its supervisor lives


def this_worker(count: int) -> Worker | None:
    """The :class:`Worker` this process is, when a supervisor started it."""
    index = os.environ.get(INDEX_ENV)
    if index is None:
        return None
    return Worker(int(index), count, os.environ.get(HUB_ENV) or None)


def restarted() -> bool:
    """True when this worker replaces one that died."""
    return os.environ.get(RESTARTED_ENV) == "1"


async def watch_parent(stop: asyncio.Event) -> None:
    """Set ``stop`` when the supervisor that started this worker is gone."""
    parent = os.getppid()
    while not stop.is_set():
        await asyncio.sleep(_WATCH_PARENT)
        if os.getppid() != parent:
            log.warning("the supervisor (pid %d) is gone: draining", parent)
            stop.set()


@dataclass
class _Slot:
    """One worker's place: its index, its current process, how it has been dying."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    backoff: float = 0.0
    waiter: asyncio.Task[int] | None = field(default=None, repr=False)


class Supervisor:
    """Runs ``count`` workers of ``argv`` (``python -m gateway ARGV``) for ``settings``."""

    def __init__(self, settings: Settings, count: int, argv: list[str]) -> None:
        self.settings = settings
        self.count = count
        self.argv = argv
        self._runtime = tempfile.mkdtemp(prefix="gateway-")
        given = os.environ.get(MULTIPROC_ENV)
        self.metrics_dir = given or os.path.join(self._runtime, "metrics")
        os.makedirs(self.metrics_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(self.metrics_dir, "*.db")):
            os.remove(stale)  # a previous run's values would be summed with ours
        self.hub: Hub | None = None
        self._slots = [_Slot(i) for i in range(count)]
        self._stopping = False

    async def run(self, stop: asyncio.Event) -> None:
        """Run the workers until ``stop`` is set, then drain them all."""
        env = {**os.environ, MULTIPROC_ENV: self.metrics_dir, "GATEWAY_WORKERS": str(self.count)}
        env.pop(HUB_ENV, None)
        if self.settings.shared_redis is None:
            self.hub = Hub(os.path.join(self._runtime, "hub.sock"))
            await self.hub.start()
            env[HUB_ENV] = self.hub.path
        self._env = env
        try:
            for slot in self._slots:
                await self._start(slot, restart=False)
            stopping = asyncio.create_task(stop.wait())
            while not stop.is_set():
                waiters = {s.waiter for s in self._slots if s.waiter is not None}
                done, _ = await asyncio.wait(
                    {stopping, *waiters}, return_when=asyncio.FIRST_COMPLETED
                )
                for slot in self._slots:
                    if slot.waiter in done and not stop.is_set():
                        await self._died(slot, stop)
            await self._drain()
        finally:
            await self._kill_all()
            if self.hub is not None:
                await self.hub.close()
            shutil.rmtree(self._runtime, ignore_errors=True)

    async def _start(self, slot: _Slot, restart: bool) -> None:
        env = {**self._env, INDEX_ENV: str(slot.index)}
        if restart:
            env[RESTARTED_ENV] = "1"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", *self.argv, env=env
        )
        slot.proc, slot.started = proc, time.monotonic()
        slot.waiter = asyncio.create_task(proc.wait(), name=f"worker-{slot.index}")
        log.info("worker %d started (pid %d)", slot.index, proc.pid)

    async def _died(self, slot: _Slot, stop: asyncio.Event) -> None:
        """Log a worker's death, clear its live gauges, and start another in its place."""
        proc = slot.proc
        assert proc is not None and proc.returncode is not None
        code = proc.returncode
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
        mark_process_dead(proc.pid, self.metrics_dir)
        quick = time.monotonic() - slot.started < _QUICK_DEATH
        slot.backoff = min(_MAX_BACKOFF, max(0.5, slot.backoff * 2)) if quick else 0.0
        log.warning(
            "worker %d (pid %d) exited with %s; starting it again%s",
            slot.index,
            proc.pid,
            how,
            f" in {slot.backoff:g}s" if slot.backoff else "",
        )
        slot.waiter = None
        if slot.backoff:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(slot.backoff):
                    await stop.wait()
        if not stop.is_set():
            await self._start(slot, restart=True)

    async def _drain(self) -> None:
        """SIGTERM every worker and wait for them to drain (``shutdown_grace``)."""
        log.info("shutting down %d workers", self.count)
        running = [s.proc for s in self._slots if s.proc is not None and s.proc.returncode is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.shutdown_grace + _KILL_AFTER):
                await asyncio.gather(*(proc.wait() for proc in running))

    async def _kill_all(self) -> None:
        """Kill what is still running (a worker that would not stop, or an error here)."""
        for slot in self._slots:
            proc = slot.proc
            if proc is not None and proc.returncode is None:
                log.warning("worker %d (pid %d) did not stop: killing it", slot.index, proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await proc.wait()
            if slot.waiter is not None:
                slot.waiter.cancel()
