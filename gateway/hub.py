"""The bus of :mod:`breakers.shared` between the workers of one machine, when no Redis is
configured: the supervisor (``--workers``) runs a :class:`Hub` on a Unix socket, and each
worker's :class:`HubBus` connects to it.

The protocol is one JSON object per line. A worker sends ``{"op": "pub", "m": MESSAGE}``
(the hub passes it to every other worker as ``{"m": MESSAGE}``), ``{"op": "claim", "id":
N, "k": KEY, "v": TOKEN, "ttl": MS}`` (answered ``{"id": N, "left": MS}``, 0 when taken)
and ``{"op": "release", "k": KEY, "v": TOKEN}``. The hub holds the leases, each until
its expiry or its release. Everything is bounded: a line's length, the leases held, and
what waits for a worker that stops reading (it misses messages rather than growing the
hub's memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from typing import Any

import orjson

from breakers.shared import Message, Sharing
from gateway import metrics

log = logging.getLogger("gateway")

_MAX_LINE = 256 * 1024
_MAX_LEASES = 10_000
_MAX_BUFFERED = 1 << 20  # bytes waiting for one worker; past it, messages to it are dropped
_TIMEOUT = 0.5  # a claim's answer
_RETRY = 1.0  # seconds between attempts to reach the hub
_LOST = -1  # a claim's answer when the hub did not give one


class Hub:
    """The supervisor's side: passes messages between workers and holds the leases."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._writers: set[asyncio.StreamWriter] = set()
        self._leases: dict[str, tuple[str, float]] = {}  # key -> (token, loop time it ends)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen on the Unix socket at :attr:`path` (only this user may connect)."""
        self._server = await asyncio.start_unix_server(self._serve, self.path, limit=_MAX_LINE)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        """Stop listening and drop the workers' connections."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                try:
                    request = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(request, dict):
                    self._handle(request, writer)
        except (OSError, ValueError, asyncio.LimitOverrunError):
            pass  # a worker that died or wrote nonsense: its connection ends
        finally:
            self._writers.discard(writer)
            writer.close()

    def _handle(self, request: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        op = request.get("op")
        if op == "pub":
            line = orjson.dumps({"m": request.get("m")}) + b"\n"
            for other in self._writers:
                if other is not writer:
                    _write(other, line)
        elif op == "claim":
            left = self._claim(str(request.get("k")), str(request.get("v")), request.get("ttl"))
            _write(writer, orjson.dumps({"id": request.get("id"), "left": left}) + b"\n")
        elif op == "release":
            key = str(request.get("k"))
            held = self._leases.get(key)
            if held is not None and held[0] == request.get("v"):
                del self._leases[key]

    def _claim(self, key: str, token: str, ttl: Any) -> int:
        now = asyncio.get_running_loop().time()
        held = self._leases.get(key)
        if held is not None and held[1] > now:
            return max(1, int((held[1] - now) * 1000))
        if len(self._leases) >= _MAX_LEASES:
            self._leases = {k: v for k, v in self._leases.items() if v[1] > now}
            if len(self._leases) >= _MAX_LEASES:
                return 1000  # full of live leases: nobody gets one now
        ms = ttl if isinstance(ttl, int) and 0 < ttl <= 86_400_000 else 1000
        self._leases[key] = (token, now + ms / 1000)
        return 0


def _write(writer: asyncio.StreamWriter, line: bytes) -> None:
    if writer.transport.get_write_buffer_size() > _MAX_BUFFERED:
        return  # a worker that does not read: it misses this one
    writer.write(line)


class HubBus:
    """A worker's side: the :class:`breakers.shared.Bus` through the supervisor's hub."""

    name = "workers"

    def __init__(self, path: str, replica: str) -> None:
        self.path = path
        self.replica = replica
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._ids = itertools.count(1)
        self._sharing: Sharing | None = None
        self._task: asyncio.Task[None] | None = None
        self.error: str | None = "not connected yet"

    @property
    def up(self) -> bool:
        """True while connected to the hub."""
        return self._writer is not None

    def publish(self, message: Message) -> None:
        """Send ``message`` to the other workers (dropped while not connected)."""
        self._send({"op": "pub", "m": message}, counted=True)

    async def claim(self, key: str, token: str, ttl: float) -> float | None:
        """Take the lease ``key`` (see :class:`breakers.shared.Bus`)."""
        if self._writer is None:
            metrics.SHARED_ERRORS.labels("claim").inc()
            return None
        request_id = next(self._ids)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        ms = max(1, int(ttl * 1000))
        try:
            self._send({"op": "claim", "id": request_id, "k": key, "v": token, "ttl": ms})
            async with asyncio.timeout(_TIMEOUT):
                left = await future
        except TimeoutError:
            left = _LOST
        finally:
            self._pending.pop(request_id, None)
        if left == _LOST:  # no answer in time, or the hub went away meanwhile
            metrics.SHARED_ERRORS.labels("claim").inc()
            return None
        return left / 1000

    def release(self, key: str, token: str) -> None:
        """Give the lease back, if ``token`` still holds it."""
        self._send({"op": "release", "k": key, "v": token})

    def _send(self, request: dict[str, Any], counted: bool = False) -> None:
        writer = self._writer
        if writer is None or writer.transport.get_write_buffer_size() > _MAX_BUFFERED:
            if counted:
                metrics.SHARED_MESSAGES.labels("dropped").inc()
            return
        writer.write(orjson.dumps(request) + b"\n")
        if counted:
            metrics.SHARED_MESSAGES.labels("sent").inc()

    def start(self, sharing: Sharing) -> None:
        """Connect (and reconnect) in the background for ``sharing``."""
        self._sharing = sharing
        self._task = asyncio.create_task(self._run(), name="hub-bus")

    async def close(self) -> None:
        """Disconnect."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def health(self) -> dict[str, Any]:
        """For ``/readyz``."""
        if self._writer is not None:
            return {"backend": self.name, "status": "ok"}
        return {"backend": self.name, "status": "unreachable", "error": self.error}

    async def _run(self) -> None:
        assert self._sharing is not None
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path, limit=_MAX_LINE)
            except OSError as e:
                self.error = e.strerror or str(e)
                await asyncio.sleep(_RETRY)
                continue
            self._writer, self.error = writer, None
            metrics.SHARED_UP.set(1)
            self._sharing.joined()
            try:
                await self._read(reader)
            except (OSError, ValueError, asyncio.LimitOverrunError) as e:
                self.error = str(e) or type(e).__name__
            finally:
                self._writer = None
                metrics.SHARED_UP.set(0)
                writer.close()
                for future in self._pending.values():
                    if not future.done():
                        future.set_result(_LOST)  # not cancel(): the request goes on
            self.error = self.error or "the supervisor closed the connection"
            log.warning("workers: lost the supervisor's hub (%s); deciding alone", self.error)
            await asyncio.sleep(_RETRY)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        assert self._sharing is not None
        while line := await reader.readline():
            try:
                frame = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(frame, dict):
                continue
            if "id" in frame:
                future = self._pending.get(frame["id"])
                left = frame.get("left")
                if future is not None and not future.done() and isinstance(left, int) and left >= 0:
                    future.set_result(left)
            elif "m" in frame:
                applied = self._sharing.receive(frame["m"])
                if applied is not None:
                    metrics.SHARED_MESSAGES.labels("received" if applied else "dropped").inc()
