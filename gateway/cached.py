"""How a request that asked for the cache is answered: a hit, a shared call, or a miss.

:meth:`CachedAnswers.answer` plans (``gateway.cache``), looks the answer up and replays a
hit byte for byte (converted when the request wants the other form: ``gateway.convert``).
On a miss the request joins the flight of an identical request already upstream
(``coalesced``), or starts one (``miss``; ``gateway.coalesce``); the flight stores a
complete answer before its last byte goes out, so that a client that repeats a request
once its answer has ended gets a hit, from any gateway that shares the cache.

A flight's upstream call is its first client's: that client gets the attempts, the
failures and the tokens in its log line and metrics. The others get the answer only: a
complete answer or, for a stream, every byte (a stream cut after its first token is cut
for all). When the flight fails before a client got anything (no provider answered, the
upstream's own error, a cut stream that client could not follow), that client is
answered by its own try instead: the first of them starts a new flight, which the others
follow. Each waits no longer than its own deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import aiohttp
from aiohttp import web

from gateway import metrics
from gateway.auth import CLIENT_KEY
from gateway.cache import Cache, Entry, Plan
from gateway.call import Call, Reply
from gateway.coalesce import Flight, Reader, Sink
from gateway.config import Settings
from gateway.convert import ConvertError, answer_to_stream, stream_to_answer
from gateway.errors import GatewayError, Outcome
from gateway.failover import run
from gateway.respond import (
    SHUTDOWN_REASON,
    error_response,
    gateway_headers,
    send_body,
    send_reply,
    shutdown_response,
    sse_headers,
)
from gateway.routing import Route
from gateway.sse import error_event
from gateway.stream import relay
from gateway.upstream import Provider

log = logging.getLogger("gateway")


def _too_late() -> GatewayError:
    return GatewayError(
        504,
        "The request timed out before any provider answered.",
        type_="timeout",
        code="request_timeout",
    )


def _include_usage(call: Call) -> bool:
    options = call.body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class CachedAnswers:
    """The cache and the flights in progress, for the request path."""

    def __init__(self, cache: Cache, settings: Settings) -> None:
        """One per application."""
        self.cache = cache
        self.settings = settings
        self.flights: dict[str, Flight] = {}  # by cache key: calls upstream now

    async def answer(
        self, request: web.Request, call: Call, routes: Sequence[Route[Provider]]
    ) -> web.StreamResponse | None:
        """The response when the cache takes ``call``; None when it does not (nobody asked,
        or the request bypasses it: then ``call.cache`` says ``bypass``)."""
        try:
            plan = self.cache.plan(request.headers, call, routes, request.get(CLIENT_KEY, ""))
            if plan is None:
                return None
            if plan.bypass:
                call.cache = "bypass"
                return None
            if plan.lookup:
                t0 = time.perf_counter()
                entry = await self.cache.get(plan.key)
                call.waited += time.perf_counter() - t0  # Redis, not the gateway
                if entry is not None:
                    resp = await self._replay(request, call, entry)
                    if resp is not None:
                        return resp
            return await self._fly(request, call, routes, plan)
        except GatewayError as e:
            return error_response(call, e)

    async def _replay(
        self, request: web.Request, call: Call, entry: Entry
    ) -> web.StreamResponse | None:
        """A hit: the stored bytes, or their conversion; None if they cannot be read."""
        try:
            if call.stream:
                body = entry.body
                if entry.kind == "json":
                    body = answer_to_stream(body, call.endpoint, _include_usage(call))
            else:
                body = entry.body
                if entry.kind == "sse":
                    body = stream_to_answer(body, call.endpoint)
        except ConvertError:
            return None
        call.cache = "hit"
        call.cache_source = entry.provider
        call.status = 200
        call.result = Outcome.OK.value
        if call.stream:
            headers = sse_headers(call)
            call.first_token_at = time.perf_counter()
        else:
            headers = {"Content-Type": "application/json", **gateway_headers(call)}
        metrics.CACHE_BYTES.labels("served").inc(len(body))
        return await send_body(request, call, 200, headers, body, self.settings)

    async def _fly(
        self, request: web.Request, call: Call, routes: Sequence[Route[Provider]], plan: Plan
    ) -> web.StreamResponse:
        """Share the flight of an identical request, or start one; on a failure that this
        request can still escape, try again (its own deadline bounds it)."""
        loop = asyncio.get_running_loop()
        while True:
            flight = self.flights.get(plan.key)
            first = flight is None or not flight.joinable
            if first:
                flight = self._start(request, call, routes, plan)
                call.cache = "miss"
            else:
                call.cache = "coalesced"
            assert flight is not None
            resp = await self._read(request, call, flight, first)
            if resp is not None:
                return resp
            if loop.time() >= call.deadline:
                raise _too_late()

    def _start(
        self, request: web.Request, call: Call, routes: Sequence[Route[Provider]], plan: Plan
    ) -> Flight:
        flight = Flight(plan.key, call, self.settings.cache.max_entry_bytes)
        flight.task = asyncio.create_task(self._produce(request, flight, routes, plan))
        if self.settings.cache.coalesce:
            self.flights[plan.key] = flight
        return flight

    async def _produce(
        self, request: web.Request, flight: Flight, routes: Sequence[Route[Provider]], plan: Plan
    ) -> None:
        """The upstream call. A complete answer is stored before its last byte goes to the
        readers, so that a client that repeats a request after its answer ended gets a hit,
        from any gateway that shares the cache."""
        call = flight.call
        try:
            try:
                answer = await run(call, routes)
            except GatewayError as e:
                flight.fail(e)
                return
            provider = answer.provider
            if provider is not call.first_route:
                log.info("Using %s (failover) [%s]", provider.display_name, call.request_id)
            if isinstance(answer, Reply):
                ok = answer.outcome is Outcome.OK
                if ok:
                    await self._store(plan, call, Entry("json", answer.body, provider.name, 0))
                flight.settle(answer, ok)
                return
            state = answer.state

            async def store(last: bytes) -> None:
                if not state.dropped and not flight.overflowed:
                    body = b"".join(flight.chunks) + last
                    await self._store(plan, call, Entry("sse", body, provider.name, 0))

            await relay(request, call, answer, Sink(flight, state, store))
            flight.settle(None, False)
        except asyncio.CancelledError:
            raise  # its last reader left
        except Exception:
            log.exception("unexpected error in a shared upstream call [%s]", call.request_id)
            flight.fail(GatewayError(500, "Internal gateway error", type_="server_error"))
        finally:
            if not flight.ended:
                flight.settle(None, False)
            if self.flights.get(flight.key) is flight:
                del self.flights[flight.key]

    async def _store(self, plan: Plan, call: Call, entry: Entry) -> None:
        """Store ``entry`` (stamped now) if it is worth it; never fails the answer."""
        entry = replace(entry, created=time.time())
        try:
            await self.cache.put(plan.key, entry, plan.ttl, call.endpoint)
        except Exception:
            log.exception("could not store an answer in the cache [%s]", call.request_id)

    async def _read(
        self, request: web.Request, call: Call, flight: Flight, first: bool
    ) -> web.StreamResponse | None:
        """``call``'s response from ``flight``; None when it must try on its own."""
        reader = flight.join(call.stream)
        try:
            if call.stream:
                return await self._read_stream(request, call, flight, reader, first)
            await self._wait(call, flight, first, lambda: flight.ended or flight.overflowed)
            return await self._send_answer(request, call, flight, first)
        except asyncio.CancelledError as e:
            if e.args == (SHUTDOWN_REASON,):
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                return shutdown_response(call)
            self._client_left(call, flight, reader)
            raise
        finally:
            flight.leave(reader)

    async def _wait(
        self, call: Call, flight: Flight, first: bool, ready: Callable[[], bool]
    ) -> None:
        """Until ``ready()``; a follower no longer than its own deadline."""
        t0 = time.perf_counter()
        try:
            while not ready():
                if first:  # the flight's own deadline is this request's
                    await flight.changed()
                    continue
                try:
                    async with asyncio.timeout_at(call.deadline):
                        await flight.changed()
                except TimeoutError:
                    raise _too_late() from None
        finally:
            if not first:
                call.waited += time.perf_counter() - t0

    def _follow(self, call: Call, flight: Flight) -> None:
        """A follower's record of who answered (the attempts were the flight's)."""
        call.first_route = flight.call.first_route
        call.answered_by = flight.call.answered_by
        call.status = 200

    async def _send_answer(
        self, request: web.Request, call: Call, flight: Flight, first: bool
    ) -> web.StreamResponse | None:
        """A non-stream response from an ended flight; None to try on its own."""
        reply = flight.reply
        if not flight.complete or flight.overflowed:
            return await self._failure(request, call, flight) if first else None
        if reply is not None:
            resp = await send_reply(request, call, reply, self.settings)
            if not first:
                call.usage = None  # the tokens were the flight's first client's
            return resp
        try:
            body = stream_to_answer(b"".join(flight.chunks), call.endpoint)
        except ConvertError:
            return None
        self._follow(call, flight)
        call.result = Outcome.OK.value
        headers = {"Content-Type": "application/json", **gateway_headers(call)}
        return await send_body(request, call, 200, headers, body, self.settings)

    async def _failure(
        self, request: web.Request, call: Call, flight: Flight
    ) -> web.StreamResponse:
        """The flight's first client gets what its call came to, as without the cache: the
        gateway's error, or the upstream's own."""
        if flight.reply is not None:
            return await send_reply(request, call, flight.reply, self.settings)
        error = flight.error or GatewayError(500, "Internal gateway error", type_="server_error")
        return error_response(call, error)

    async def _read_stream(
        self, request: web.Request, call: Call, flight: Flight, reader: Reader, first: bool
    ) -> web.StreamResponse | None:
        await self._wait(call, flight, first, lambda: flight.committed or flight.ended)
        if not flight.committed:
            reply = flight.reply
            if flight.complete and reply is not None:  # a non-stream flight's answer
                try:
                    body = answer_to_stream(reply.body, call.endpoint, _include_usage(call))
                except ConvertError:
                    return None
                self._follow(call, flight)
                call.result = Outcome.OK.value
                call.first_token_at = time.perf_counter()
                return await send_body(request, call, 200, sse_headers(call), body, self.settings)
            return await self._failure(request, call, flight) if first else None
        if not first:
            self._follow(call, flight)
        resp = web.StreamResponse(status=200, headers=sse_headers(call))
        await resp.prepare(request)
        if call.first_token_at is None:
            call.first_token_at = time.perf_counter()
        try:
            await self._pipe(resp, flight, reader)
        except asyncio.CancelledError as e:
            if e.args != (SHUTDOWN_REASON,):
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            call.result = "shutdown"
            message = "The gateway is shutting down; the answer is incomplete."
            await self._end(resp, error_event(message, "server_error", "shutting_down"))
            return resp
        except TimeoutError:  # it stopped reading: drop it, the flight goes on for others
            call.result = "client_stalled"
            metrics.CLIENT_DISCONNECTS.inc()
            if request.transport is not None:
                request.transport.abort()
            return resp
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            self._client_left(call, flight, reader)
            return resp
        if not first:
            call.result = Outcome.OK.value if flight.complete else flight.call.result
        return resp

    async def _pipe(self, resp: web.StreamResponse, flight: Flight, reader: Reader) -> None:
        """Write the flight's bytes as they come, each write bounded by ``send_timeout``."""
        send_timeout = self.settings.send_timeout
        while True:
            data = flight.read(reader)
            if data:
                async with asyncio.timeout(send_timeout):
                    await resp.write(data)
                continue
            if flight.eof:
                break
            if flight.ended:  # ended without its last byte: never a silent truncation
                message = "The stream ended before it was complete."
                await self._end(resp, error_event(message, code="stream_interrupted"))
                return
            await flight.changed()
        async with asyncio.timeout(send_timeout):
            await resp.write_eof()

    @staticmethod
    async def _end(resp: web.StreamResponse, event: bytes) -> None:
        try:
            async with asyncio.timeout(1):
                await resp.write(event)
                await resp.write_eof()
        except (TimeoutError, ConnectionResetError):
            pass

    @staticmethod
    def _client_left(call: Call, flight: Flight, reader: Reader) -> None:
        call.result = Outcome.CANCELLED.value
        # The last reader of a stream in progress cancels the relay, which counts it.
        if not (flight.committed and not flight.eof and flight.alone(reader)):
            metrics.CLIENT_DISCONNECTS.inc()

    async def close(self) -> None:
        """Stop the flights still in the air, then the backend."""
        tasks = [f.task for f in self.flights.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await self.cache.close()
