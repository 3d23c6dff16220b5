"""Sending upstream answers to the client.

Non-streaming bodies go out as the bytes that came in. A stream is committed at its
first token (:class:`gateway.failover.StreamStart`): the held events go out, then every
read from upstream is forwarded in one write, byte for byte. Each event is parsed only
to check it and to notice ``finish_reason`` and ``usage``. A failure after commit ends
the stream with one error event and no ``[DONE]``; a truncated answer is never shown as
complete.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

from gateway import metrics
from gateway.errors import Classified, Outcome, classify_error_body, classify_exception
from gateway.failover import Call, Reply, StreamStart
from gateway.sse import DONE, DONE_EVENT, Event, SSEError, error_event, finish_reason

log = logging.getLogger("gateway")

_PASSED_PREFIXES = ("x-ratelimit-", "openai-")
#: The cancel message with which a graceful shutdown ends requests past their grace.
SHUTDOWN_REASON = "gateway shutting down"
_SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def gateway_headers(call: Call) -> dict[str, str]:
    """The ``x-gateway-*`` and ``x-request-id`` headers for ``call``'s response."""
    provider = call.answered_by
    return {
        "x-gateway-provider": provider.name if provider is not None else "none",
        "x-gateway-attempts": str(len(call.records)),
        "x-gateway-failover": "true" if call.failover else "false",
        "x-request-id": call.request_id,
    }


def _passed_headers(upstream: CIMultiDictProxy[str]) -> dict[str, str]:
    """Upstream headers worth keeping; hop-by-hop, length and encoding are dropped
    (aiohttp has already decompressed the body)."""
    headers = {"Content-Type": upstream.get("Content-Type", "application/json")}
    for name, value in upstream.items():
        if name.lower().startswith(_PASSED_PREFIXES):
            headers[name] = value
    return headers


def reply_response(call: Call, reply: Reply) -> web.Response:
    """The client's response for a complete upstream answer, body untouched."""
    call.answered_by = reply.provider
    call.status = reply.status
    call.usage = reply.usage
    call.result = reply.outcome.value
    headers = _passed_headers(reply.headers)
    headers.update(gateway_headers(call))
    return web.Response(status=reply.status, body=reply.body, headers=headers)


@dataclass(slots=True)
class _Progress:
    finish: str | None = None
    done: bool = False
    usage: dict[str, Any] | None = None


def _take(
    events: list[Event], parts: list[bytes], progress: _Progress, call: Call
) -> Classified | None:
    """Queue valid events for the client; an upstream error event is returned."""
    for event in events:
        data = event.data
        if data is None:
            parts.append(event.raw)  # comments keep idle connections alive downstream too
            continue
        if data == DONE:
            if progress.finish is None:  # e.g. llama.cpp interrupted: cut, not complete
                return Classified(Outcome.BAD_RESPONSE, "[DONE] came before any finish_reason")
            progress.done = True
            parts.append(event.raw)
            return None
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            assert call.answered_by is not None
            metrics.DROPPED_EVENTS.labels(call.answered_by.name).inc()
            log.warning("dropped a malformed stream event [%s]", call.request_id)
            continue
        if isinstance(obj, dict):
            if "error" in obj or event.name == "error":
                return classify_error_body(200, obj)
            if progress.finish is None:
                progress.finish = finish_reason(obj)
            usage = obj.get("usage")
            if usage:
                progress.usage = usage
        parts.append(event.raw)
    return None


async def relay_stream(request: web.Request, call: Call, start: StreamStart) -> web.StreamResponse:
    """Commit ``start`` to the client and pipe the rest of the upstream stream."""
    provider = start.provider
    upstream = start.resp
    call.answered_by = provider
    call.status = 200
    headers = dict(_SSE_HEADERS)
    headers.update(gateway_headers(call))
    resp = web.StreamResponse(status=200, headers=headers)
    progress = _Progress()
    outcome = Outcome.CANCELLED
    try:
        await resp.prepare(request)
        call.first_token_at = time.perf_counter()
        failure = await _pipe(resp, call, start, progress)
        if failure is not None:
            outcome = failure.outcome
            call.result = f"cut:{failure.outcome.value}"
        else:
            outcome = Outcome.OK
            call.result = Outcome.OK.value
        await resp.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        _client_left(call)
    except asyncio.CancelledError as e:
        if e.args != (SHUTDOWN_REASON,):
            _client_left(call)
            raise
        # The client is still there: tell it why its stream ends here.
        asyncio.current_task().uncancel()  # type: ignore[union-attr]
        call.result = "shutdown"
        message = "The gateway is shutting down; the answer is incomplete."
        try:
            async with asyncio.timeout(1):
                await resp.write(error_event(message, "server_error", "shutting_down"))
                await resp.write_eof()
        except (TimeoutError, ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
    finally:
        call.usage = progress.usage
        start.lease.finish(outcome)
        if outcome is Outcome.OK:
            upstream.release()  # back to the pool if the body was read to its end
        else:
            upstream.close()
    return resp


async def _pipe(
    resp: web.StreamResponse, call: Call, start: StreamStart, progress: _Progress
) -> Classified | None:
    """Forward events until the stream ends; the failure that ended it, if any."""
    watchdog = _Watchdog(start.provider.config.idle_timeout, call.deadline)
    try:
        return await _forward(resp, call, start, progress, watchdog)
    finally:
        watchdog.cancel()


async def _forward(
    resp: web.StreamResponse,
    call: Call,
    start: StreamStart,
    progress: _Progress,
    watchdog: _Watchdog,
) -> Classified | None:
    provider = start.provider
    parser = start.parser
    content = start.resp.content
    loop = asyncio.get_running_loop()
    parts = list(start.held)
    events = start.backlog
    ended: Classified | None = None  # why reading stopped, if it did
    while True:
        failure = _take(events, parts, progress, call)
        if failure is None and ended is not None and not progress.done:
            if progress.finish is not None:
                parts.append(DONE_EVENT)  # complete but for the [DONE] line
            else:
                failure = ended
        if failure is not None:
            message = (
                f"{provider.display_name} stream failed after the first token: {failure.detail}"
            )
            log.warning("%s [%s]", message, call.request_id)
            parts.append(error_event(message, code="stream_interrupted"))
        if parts:
            t0 = time.perf_counter()
            await resp.write(b"".join(parts))
            blocked = time.perf_counter() - t0
            if blocked > 0.001:  # waited for a slow client to drain: not the gateway's cost
                call.waited += blocked
            parts = []
        if failure is not None or progress.done or ended is not None:
            return failure
        t0 = time.perf_counter()
        now = loop.time()
        if now >= call.deadline:
            chunk, ended = b"", Classified(Outcome.TIMEOUT, "request deadline reached")
        else:
            watchdog.read_since = now
            try:
                chunk = await content.readany()
            except asyncio.CancelledError:
                if not watchdog.fired:
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                chunk, ended = b"", Classified(Outcome.TIMEOUT, watchdog.reason())
            except (aiohttp.ClientError, OSError) as e:
                chunk, ended = b"", classify_exception(e)
            watchdog.read_since = None
        call.waited += time.perf_counter() - t0
        try:
            if chunk:
                events = parser.feed(chunk)
            else:
                events = parser.finish()
                ended = ended or Classified(
                    Outcome.BAD_RESPONSE, "stream ended before a finish_reason"
                )
        except SSEError as e:
            events, ended = [], Classified(Outcome.BAD_RESPONSE, str(e))
            progress.finish = None  # an unreadable stream is not complete


class _Watchdog:
    """Cancels the relay's task when a read waits past ``idle`` seconds or the deadline.

    One timer per idle period instead of an ``asyncio.timeout`` per read (about 5 us
    each): a read only stamps ``read_since``.
    """

    __slots__ = ("_deadline", "_handle", "_idle", "_loop", "_task", "fired", "read_since")

    def __init__(self, idle: float, deadline: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._idle = idle
        self._deadline = deadline
        self.read_since: float | None = None  # loop time at which the pending read began
        self.fired = False
        self._handle = self._loop.call_at(min(self._loop.time() + idle, deadline), self._check)

    def _check(self) -> None:
        now = self._loop.time()
        since = self.read_since
        if since is None:  # between reads: look again later (a read checks the deadline)
            when = min(now + self._idle, self._deadline)
            if when <= now:
                when = now + self._idle
        else:
            when = min(since + self._idle, self._deadline)
            if now >= when:
                self.fired = True
                assert self._task is not None
                self._task.cancel()
                return
        self._handle = self._loop.call_at(when, self._check)

    def reason(self) -> str:
        """Why it fired."""
        if self._loop.time() >= self._deadline:
            return "request deadline reached"
        return f"no event for {self._idle:g}s"

    def cancel(self) -> None:
        """Stop watching."""
        self._handle.cancel()


def _client_left(call: Call) -> None:
    call.result = Outcome.CANCELLED.value
    metrics.CLIENT_DISCONNECTS.inc()
