"""Client connections: a header timeout, a cap on open connections, and OpenAI-shaped
answers to malformed HTTP.

aiohttp's server has none of the first two (its ``keepalive_timeout`` counts from the
last response, not from the first byte of a request, and defaults to an hour) and
answers a malformed request with a plain-text page that quotes the offending bytes,
logged with a traceback. :class:`GatewayRunner` is an :class:`aiohttp.web.AppRunner`
whose server adds them, as nginx does by default (``client_header_timeout``,
``keepalive_timeout``, ``worker_connections``):

- a connection must deliver a complete request head within ``client_header_timeout``
  of being opened, or of the first byte of a later request on it; one that sent part of
  a head is answered 408, one that sent nothing is closed without a word;
- a keep-alive connection idle for ``keepalive_timeout`` after a response is closed;
- past ``max_client_connections`` open connections, a new one is answered 503
  ``too_many_connections`` and closed at once;
- a request that cannot be parsed gets a 400 in the OpenAI error shape, with a reason
  that does not quote the client's bytes, and one log line.

The body's own timeout (``client_body_timeout``) lives where the body is read, in
:mod:`gateway.server`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

from aiohttp import web
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from gateway.config import Settings
from gateway.errors import error_body
from gateway.logsafe import escape

log = logging.getLogger("gateway")

# After the drain in gateway.server has ended every proxied request, what aiohttp still
# waits for is small: a handler of a quick GET, or a lingering read of a body nobody
# wanted. Its default of 60 s would let a stalled client hold up the exit.
SHUTDOWN_TIMEOUT = 1.0
# Answers after which an unread request body is not read on (see finish_response).
_CUT_SHORT = frozenset({408, 503})
# A warning about the connection cap at most this often: a flood would otherwise log
# one line per refused connection.
_CAP_WARNING_INTERVAL = 10.0


def _raw_response(
    status: str, message: str, code: str, type_: str = "invalid_request_error", extra: str = ""
) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, encoded once."""
    body = error_body(message, type_, code)
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _Refusal(asyncio.Protocol):
    """What a connection over the cap gets: a 503 and a close, before anything is read."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Answer and hang up (a client still sending may see a reset instead)."""
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.answer)
        transport.close()


class _Handler(RequestHandler):
    """aiohttp's protocol with request-head and idle timeouts and OpenAI-shaped parse
    errors.

    One timer per connection, re-armed lazily (like aiohttp's own keep-alive timer: no
    cancel and new handle per request), watches the time while the connection waits for
    a request head: ``client_header_timeout`` from the connection's start, or from the
    first byte of a later request; ``keepalive_timeout`` after a response until that
    byte. While a request is in its handler the timer only looks again later.
    """

    def __init__(self, manager: GatewayServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = manager.header_timeout
        self._idle_timeout = manager.idle_timeout
        self._timeout_answer = manager.timeout_answer
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._idle = False  # the deadline is the keep-alive one, not a request head's
        self._head_started = False  # bytes of the awaited request head have arrived

    def _awaiting_head(self) -> bool:
        # aiohttp's own test for "between requests" (its keep-alive timer uses it): the
        # protocol waits on this future until the parser yields the next request.
        waiter = self._waiter
        if waiter is not None:
            return not waiter.done()
        # Before the protocol's task first waits: uvloop delivers the first bytes right
        # after connection_made. No request in hand and none parsed: a head is arriving.
        return getattr(self, "_current_request", None) is None and not getattr(
            self, "_messages", ()
        )

    def _set_deadline(self, delay: float, idle: bool) -> None:
        self._deadline = self._loop.time() + delay
        self._idle = idle
        timer = self._timer
        if timer is None or self._deadline < timer.when():
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(self._deadline, self._timed_out)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """A new connection: its first request head must be complete in time."""
        super().connection_made(transport)
        self._set_deadline(self._header_timeout, idle=False)

    def data_received(self, data: bytes) -> None:
        """Notice the first byte of a request head on an idle keep-alive connection."""
        request = getattr(self, "_current_request", None)
        queue = getattr(self, "_messages", ())
        queued = len(queue)
        super().data_received(data)
        if request is not None and len(queue) > queued:
            self._fail_body(request, queue[-1][0])
        if not data or not self._awaiting_head():
            self._head_started = False  # a head completed, or a body is arriving
        elif not self._head_started:
            self._head_started = True
            if self._idle:  # a later request: its head gets the full header timeout
                self._set_deadline(self._header_timeout, idle=False)

    async def finish_response(
        self, request: Any, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """After each response the connection is idle until the next request begins.

        A request whose body was cut short by a stall (408) or by shutdown (503) has its
        connection closed at once: aiohttp would otherwise linger for up to 10 s reading a
        body that is not coming (nginx closes too), and hold up the exit that long.
        """
        try:
            result = await super().finish_response(request, resp, start_time)
        finally:
            self._head_started = False
            if self.transport is not None:
                self._set_deadline(self._idle_timeout, idle=True)
        if resp.status in _CUT_SHORT and not request.content.is_eof():
            self.force_close()
        return result

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        if self._loop.time() < self._deadline:  # moved later since this timer was set
            self._timer = self._loop.call_at(self._deadline, self._timed_out)
            return
        if not self._awaiting_head():  # in a handler, or reading a body nobody wanted
            self._set_deadline(self._idle_timeout, idle=True)
            return
        if self._head_started:  # a request had begun: say why it ends, as nginx does
            self.transport.write(self._timeout_answer)
        self.force_close()

    def _fail_body(self, request: Any, message: Any) -> None:
        """When the framing of a body turns bad mid-way (a bad chunk size), aiohttp's C
        parser queues a parse error for after the current request and drops the body it
        was feeding: the handler would wait for the rest until ``client_body_timeout``.
        Hand the error to the body instead (the handler answers 400), and close the
        connection after that answer so the queued error is not answered a second time."""
        if isinstance(message, RawRequestMessage) or request.content.is_eof():
            return  # a pipelined request, or a body that had already ended
        cause = getattr(message, "exc", None)
        request.content.set_exception(RequestPayloadError("malformed request body"), cause)
        request.content.feed_eof()  # no lingering read of a body that cannot go on
        self.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        """Drop the timer with the connection."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The answer to a request aiohttp could not parse or handle, in OpenAI's shape,
        with one log line; the client's bytes are neither echoed nor logged."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response has begun; no error response can follow")
        peer = request.remote or "unknown"
        if status >= 500:  # a bug that escaped every middleware: keep its traceback
            log.error("unhandled error answering %s", peer, exc_info=exc)
            body = error_body("Internal gateway error", type_="server_error")
        else:
            reason = parse_error_reason(exc)
            log.info("malformed HTTP request from %s: %s", peer, reason)
            body = error_body(
                f"The request is not valid HTTP/1.1: {reason}.", code="invalid_http_request"
            )
        resp = web.Response(status=status, body=body, content_type="application/json")
        resp.force_close()
        return resp


# aiohttp's parse errors put the client's bytes after the reason: on the next lines
# (C parser) or after ": b'...'" / ": bytearray(...)" / ": '...'" (pure-Python parser).
_QUOTED = re.compile(r":\s*(?:b?['\"]|bytearray\()")


def parse_error_reason(exc: BaseException | None) -> str:
    """A short reason for a parse error, without the bytes the client sent."""
    if isinstance(exc, LineTooLong):
        return "a request line or header field is too long"
    text = exc.message if isinstance(exc, HttpProcessingError) else ""
    words = []
    for line in str(text).splitlines():
        line = _QUOTED.split(line.strip(), maxsplit=1)[0].strip().rstrip(":")
        if not line:
            break  # the echo of the client's bytes follows a blank line
        words.append(line)
    return escape(": ".join(words), 200) or "malformed request"


class GatewayServer(web.Server):
    """aiohttp's low-level server, making :class:`_Handler` protocols up to a cap."""

    def __init__(
        self,
        *args: Any,
        header_timeout: float,
        idle_timeout: float,
        max_connections: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.timeout_answer = _raw_response(
            "408 Request Timeout",
            f"The request headers did not arrive within {header_timeout:g}s.",
            "request_timeout",
        )
        self._refusal = _raw_response(
            "503 Service Unavailable",
            "The gateway has too many open connections; retry shortly.",
            "too_many_connections",
            "server_error",
            "Retry-After: 1\r\n",
        )
        # Protocols made but not yet connected: asyncio may accept a burst of connections
        # before the first connection_made runs, and they count against the cap.
        self._pending = 0
        self._open = 0
        self._warned_at = -_CAP_WARNING_INTERVAL

    @property
    def open_connections(self) -> int:
        """Client connections open now (accepted, not yet closed)."""
        return self._open + self._pending

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        """A protocol for a newly accepted connection, or a refusal past the cap."""
        if self._open + self._pending >= self.max_connections:
            now = time.monotonic()
            if now - self._warned_at >= _CAP_WARNING_INTERVAL:
                self._warned_at = now
                log.warning(
                    "refusing client connections: %d open (max_client_connections)",
                    self._open + self._pending,
                )
            return _Refusal(self._refusal)
        handler = _Handler(self, loop=self._loop, **self._kwargs)
        self._pending += 1  # until asyncio calls connection_made, which it always does next
        return handler

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        """Count the connection as open."""
        self._pending -= 1
        self._open += 1
        super().connection_made(handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        """Count the connection as closed."""
        self._open -= 1
        super().connection_lost(handler, exc)


class GatewayRunner(web.AppRunner):
    """An AppRunner whose server bounds client connections as ``settings`` say."""

    def __init__(self, app: web.Application, settings: Settings, **kwargs: Any) -> None:
        # aiohttp's keep-alive timer runs from the start of a connection and from each
        # response, and would cut a request head that is still arriving: the handler's
        # own timer keeps time, and aiohttp's is left as a backstop that fires after it.
        backstop = settings.keepalive_timeout + settings.client_header_timeout + 1
        kwargs.setdefault("keepalive_timeout", backstop)
        kwargs.setdefault("shutdown_timeout", SHUTDOWN_TIMEOUT)
        super().__init__(app, **kwargs)
        self._settings = settings

    async def _make_server(self) -> web.Server:
        # AppRunner builds the app's web.Server (start-up hooks, handler arguments);
        # the same server is rebuilt as a GatewayServer with everything it was given.
        base = await super()._make_server()
        return GatewayServer(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            header_timeout=self._settings.client_header_timeout,
            idle_timeout=self._settings.keepalive_timeout,
            max_connections=self._settings.max_client_connections,
            **base._kwargs,
        )
