"""Request coalescing (single flight): identical cacheable requests share one upstream call.

A :class:`Flight` is one upstream call, made by a task of its own rather than by a
client's handler, so that the client that started it can leave without ending it for the
others. Every client of a flight, the first included, is a :class:`Reader`: a stream reader
gets the bytes as the relay writes them (through :class:`Sink`), from the first, however
late it joined; any reader gets the complete answer at the end. The flight is cancelled,
and with it the upstream request, when its last reader leaves before it ended.

The flight keeps its bytes for late joiners and for the cache up to ``limit``
(``max_entry_bytes``). Past it the flight takes no new readers, stops keeping what every
stream reader has been sent, and serves only the stream readers it has: the others go
upstream on their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest

if TYPE_CHECKING:
    from gateway.call import Call, Reply
    from gateway.errors import GatewayError
    from gateway.stream import StreamState


class Reader:
    """One client of a flight; ``pos`` counts the stream chunks it has been given."""

    __slots__ = ("pos", "streams")

    def __init__(self, streams: bool) -> None:
        self.streams = streams  # reads the bytes as they come (else waits for the end)
        self.pos = 0


class Flight:
    """One upstream call and the clients that share it."""

    def __init__(self, key: str, call: Call, limit: int) -> None:
        """``call`` is the request the upstream call is made for (its first client's)."""
        self.key = key
        self.call = call
        self.limit = limit
        self.chunks: list[bytes] = []  # stream bytes, as written by the relay
        self.dropped = 0  # chunks dropped from the front once past the limit
        self.size = 0
        self.committed = False  # a stream's first token was written
        self.eof = False  # a stream's last byte was written
        self.ended = False  # the upstream call is over
        self.complete = False  # ... with a complete answer
        self.reply: Reply | None = None  # a non-stream answer (or the upstream's error)
        self.error: GatewayError | None = None  # why no provider answered
        self.readers: list[Reader] = []
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # set (and replaced) at every change

    @property
    def overflowed(self) -> bool:
        """True once the stream is larger than what is kept: it can neither be cached nor
        replayed from its start."""
        return self.size > self.limit

    @property
    def joinable(self) -> bool:
        """True while a new client can share this flight."""
        return not self.overflowed and not (self.ended and not self.complete)

    def join(self, streams: bool) -> Reader:
        """A new reader, from the first byte."""
        reader = Reader(streams)
        self.readers.append(reader)
        return reader

    def leave(self, reader: Reader) -> None:
        """``reader`` is gone; the last one out before the end cancels the upstream call."""
        self.readers.remove(reader)
        if not self.readers and not self.ended and self.task is not None:
            self.task.cancel()

    def alone(self, reader: Reader) -> bool:
        """True when ``reader`` is the only one left."""
        return self.readers == [reader]

    def read(self, reader: Reader) -> bytes:
        """The stream bytes ``reader`` has not been given yet."""
        start = reader.pos - self.dropped
        if start >= len(self.chunks):
            return b""
        reader.pos = self.dropped + len(self.chunks)
        data = b"".join(self.chunks[start:])
        if self.overflowed:
            self._forget()
        return data

    async def changed(self) -> None:
        """Wait for the next chunk or the end (a reader that leaves cancels only its own
        wait)."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()  # wakes every reader waiting now, in one loop iteration
        self._changed = asyncio.Event()

    # -- written by the producer ---------------------------------------------------------

    def push(self, data: bytes) -> None:
        """The relay wrote ``data``."""
        self.chunks.append(data)
        self.size += len(data)
        if self.overflowed:
            self._forget()
        self._notify()

    def commit(self) -> None:
        """A stream's first token is about to be written."""
        self.committed = True
        self._notify()

    def stream_ended(self, state: StreamState) -> None:
        """The relay wrote the stream's last byte."""
        self.eof = True
        self.complete = state.done and state.failure is None
        self._notify()

    def settle(self, reply: Reply | None, complete: bool) -> None:
        """The upstream call is over (``reply`` for a non-stream answer)."""
        if reply is not None:
            self.reply = reply
            self.complete = complete
        self.ended = True
        self._notify()

    def fail(self, error: GatewayError) -> None:
        """No provider answered."""
        self.error = error
        self.settle(None, False)

    def _forget(self) -> None:
        """Past the limit, drop the chunks every stream reader has been given."""
        given = self.dropped + len(self.chunks)
        low = min((r.pos for r in self.readers if r.streams), default=given)
        cut = low - self.dropped
        if cut > 0:
            del self.chunks[:cut]
            self.dropped = low


class Sink(web.StreamResponse):
    """What a shared stream's relay writes to: the flight, which its readers read."""

    def __init__(
        self,
        flight: Flight,
        state: StreamState,
        complete: Callable[[bytes], Awaitable[None]],
    ) -> None:
        """``state`` is the stream's own: it says when the stream is complete. Then
        ``complete`` gets the last bytes before the readers do (the cache stores them)."""
        super().__init__(status=200)
        self._flight = flight
        self._state = state
        self._complete = complete

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        """The stream commits (its first token)."""
        self._flight.commit()
        return None

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes for the readers."""
        data = bytes(data)
        if self._state.done:  # the last write of a complete stream
            await self._complete(data)
        first = not self._flight.chunks
        self._flight.push(data)
        if first:  # let the readers send the first token before the relay reads on
            await asyncio.sleep(0)

    async def write_eof(self, data: bytes = b"") -> None:
        """The stream's end: readers finish without waiting for the upstream to drain."""
        if data:
            self._flight.push(data)
        self._flight.stream_ended(self._state)
