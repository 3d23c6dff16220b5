"""One upstream answer, judged: a complete body, or a stream from its first byte to its last.

A stream has one :class:`StreamState`, fed every event exactly once, before commit and
after it alike, so an answer whose first output event is also its last (an empty answer,
a one-chunk answer) is judged by the same rules as a long one:

* :func:`hold` reads events without showing the client anything until the first event
  that carries output; any failure before that is the attempt's, and the loop fails over;
* :func:`relay` commits (status, headers, the held events) and pipes the rest as the
  bytes it came in as, one ``write()`` per upstream read; a failure after commit ends the
  stream with one error event and no ``[DONE]``.

A stream is complete when every choice index that appeared has its ``finish_reason``
(``n > 1`` included); a complete stream without ``[DONE]`` gets one from the gateway.
After ``[DONE]`` the upstream body is read to its end (briefly) so that its connection
goes back to the pool.

A vendor that speaks another API (``gateway.providers``) is read through its attempt's
translator: a complete body becomes a ``chat.completion``, an error body OpenAI's error
shape, each read of a stream OpenAI SSE bytes before the parser; everything here then
judges them as it judges OpenAI's. For OpenAI-compatible upstreams the translator is the
identity and the bytes go to the parser as they came.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway import metrics
from gateway.call import Call, Reply, StreamStart
from gateway.config import Settings
from gateway.errors import (
    Classified,
    Outcome,
    classify_error_body,
    classify_exception,
    classify_response,
)
from gateway.providers.base import BadAnswer, Translator
from gateway.respond import SHUTDOWN_REASON, sse_headers
from gateway.sse import DONE, DONE_EVENT, Event, SSEError, SSEParser, error_event
from gateway.transcript import Transcript
from gateway.upstream import Lease, Provider

log = logging.getLogger("gateway")

# After [DONE], how long and how much the rest of the upstream body may take to arrive
# (the chunked terminator, usually) before the connection is closed instead of pooled.
_DRAIN_SECONDS = 1.0
_DRAIN_BYTES = 64 * 1024
# Delta fields that say who speaks, not what is said.
_NOT_OUTPUT = frozenset({"role"})


def has_output(choice: dict[str, Any]) -> bool:
    """True when a streamed choice carries something the model produced.

    Any non-empty delta field but ``role`` counts (``content``, ``tool_calls``,
    ``reasoning_content``, Ollama's ``reasoning``, ``audio``, fields not invented yet), as
    do legacy ``text`` and a ``finish_reason``.
    """
    if choice.get("finish_reason") or choice.get("text"):
        return True
    delta = choice.get("delta")
    if isinstance(delta, dict):
        for key, value in delta.items():
            if key not in _NOT_OUTPUT and value is not None and value not in ("", [], {}):
                return True
    return False


class StreamState:
    """What one upstream stream has said so far, judged event by event."""

    __slots__ = (
        "done",
        "dropped",
        "failure",
        "finished",
        "output",
        "provider",
        "request_id",
        "seen",
        "transcript",
        "usage",
    )

    def __init__(self, provider: str, request_id: str) -> None:
        self.provider = provider
        self.request_id = request_id
        self.seen: set[int] = set()  # choice indexes that appeared
        self.finished: set[int] = set()  # choice indexes with a finish_reason
        self.output = False  # the first output event has been seen: the stream commits
        self.done = False  # ended complete; nothing more goes to the client
        self.dropped = False  # a malformed event was left out after commit (never cached)
        self.failure: Classified | None = None
        self.usage: dict[str, Any] | None = None
        # The text the client has, kept only for a stream that may be rescued
        # (gateway.rescue); None costs nothing, and leaves the relay its fast path.
        self.transcript: Transcript | None = None

    @property
    def complete(self) -> bool:
        """True when every choice that appeared has finished."""
        return bool(self.finished) and self.finished >= self.seen

    def take(self, events: list[Event], out: list[bytes]) -> None:
        """Judge ``events`` in order, appending the bytes the client gets to ``out``.

        Stops at ``[DONE]`` or at the first failure (kept in :attr:`failure`).
        """
        for event in events:
            if self.done or self.failure is not None:
                return
            data = event.data
            if data is None:
                if self.output:  # keep-alives keep the client's connection open too
                    out.append(event.raw)
                continue
            if data == DONE:
                if self.complete:
                    self.done = True
                    out.append(event.raw)
                else:  # e.g. llama.cpp interrupted: a cut, not a complete answer
                    self._cut("[DONE] came before every choice had a finish_reason")
                return
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                if not self.output:
                    self.failure = Classified(Outcome.BAD_RESPONSE, "malformed SSE event")
                    return
                # After commit a bad event is dropped so that the client's stream stays
                # well-formed; it cannot change the outcome.
                metrics.DROPPED_EVENTS.labels(self.provider).inc()
                self.dropped = True
                log.warning("dropped a malformed stream event [%s]", self.request_id)
                continue
            if event.name == "error" or (isinstance(obj, dict) and obj.get("error") is not None):
                self.failure = classify_error_body(200, obj if isinstance(obj, dict) else {})
                return
            if isinstance(obj, dict):
                self._note(obj)
                if self.transcript is not None:
                    instead = self.transcript.take(obj)
                    if instead is not None:  # a rescue's stream, checked or rewritten
                        if instead:
                            out.append(instead)
                        continue
            out.append(event.raw)

    def take_blocks(self, complete: bytes, blocks: list[bytes], out: list[bytes]) -> None:
        """Judge the events of :meth:`SSEParser.feed_lf <gateway.sse.SSEParser.feed_lf>`,
        appending what the client gets to ``out``.

        After commit most events are plain content chunks that cannot change the outcome:
        a one-line ``data: {...}`` whose choices all have index 0 (already seen), no
        ``finish_reason``, no ``usage`` and no ``error``. Those are parsed (the validity
        check: a malformed event is still dropped) and passed on as runs of the bytes they
        came in, with no object per event; every other event goes through :meth:`take`,
        so the verdict is the same as event by event.
        """
        start = pos = 0
        for block in blocks:
            size = len(block) + 2
            if self.output and 0 in self.seen and _plain(block):
                pos += size
                continue
            if pos > start:
                out.append(complete[start:pos])
            self.take(_events(block), out)
            pos += size
            start = pos
            if self.done or self.failure is not None:
                return
        if pos > start:
            out.append(complete if start == 0 and pos == len(complete) else complete[start:pos])

    def _note(self, obj: dict[str, Any]) -> None:
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                index = choice.get("index", 0)
                if not isinstance(index, int):
                    index = 0
                self.seen.add(index)
                if choice.get("finish_reason"):
                    self.finished.add(index)
                    self.output = True
                elif not self.output and has_output(choice):
                    self.output = True
        usage = obj.get("usage")
        if isinstance(usage, dict) and usage:
            self.usage = usage

    def end(self, out: list[bytes]) -> None:
        """The upstream body ended: complete (``[DONE]`` added if missing), or cut."""
        if self.done or self.failure is not None:
            return
        if self.complete:
            self.done = True
            out.append(DONE_EVENT)
        else:
            self._cut("stream ended before every choice had a finish_reason")

    def fail(self, why: Classified) -> None:
        """Reading failed (timeout, lost connection) before the stream ended."""
        if not self.done and self.failure is None:
            self.failure = why

    def _cut(self, detail: str) -> None:
        if not self.output:
            detail = "stream ended before the first token"
        self.failure = Classified(Outcome.BAD_RESPONSE, detail)


def judge_read(
    state: StreamState,
    parser: SSEParser,
    feed: Callable[[bytes, bool], bytes] | None,
    chunk: bytes,
    out: list[bytes],
) -> None:
    """Judge one read of an upstream stream (``b""``: its end) into ``state``, the bytes
    for the client appended to ``out``: through the translator's ``feed`` when there is
    one, then framed.

    The events go through :meth:`StreamState.take_blocks` (plain content chunks after
    commit pass as runs of bytes) unless the state keeps a transcript for a rescue, which
    needs every event as an object. Held or relayed alike: a stream written back to back
    often arrives whole while it is still held before commit."""
    try:
        if chunk:
            if feed is not None:
                chunk = feed(chunk, False)
            framed = parser.feed_lf(chunk) if state.transcript is None else None
            if framed is None:
                state.take(parser.feed(chunk), out)
            else:
                state.take_blocks(framed[0], framed[1], out)
        else:
            if feed is not None:
                state.take(parser.feed(feed(b"", True)), out)
            state.take(parser.finish(), out)
            state.end(out)
    except SSEError as e:
        state.fail(Classified(Outcome.BAD_RESPONSE, str(e)))


def _plain(block: bytes) -> bool:
    """True for an event that cannot change a committed stream's outcome (see
    :meth:`StreamState.take_blocks`). Any doubt answers False: the exact path decides.

    orjson parses a chunk in well under a microsecond: cheaper than byte searches for the
    keys that matter, and the parse is the validity check that must happen anyway.
    """
    if not block.startswith(b"data: {") or b"\n" in block:
        return False
    try:
        obj = orjson.loads(block[6:])
    except orjson.JSONDecodeError:
        return False
    if obj.get("error") is not None or obj.get("usage") is not None:
        return False
    choices = obj.get("choices")
    if type(choices) is not list:
        return False
    for choice in choices:
        if type(choice) is not dict or choice.get("finish_reason") or choice.get("index", 0) != 0:
            return False
    return True


def _events(block: bytes) -> list[Event]:
    """The events in one text that :meth:`SSEParser.feed_lf` split off; their raw bytes
    together are exactly the text and its blank line."""
    raw = block + b"\n\n"
    if block.startswith(b"data: ") and b"\n" not in block:
        return [Event(raw, block[6:])]
    return SSEParser(len(raw) + 1).feed(raw)


# -- judging an answer ---------------------------------------------------------------

#: How much of an error body is read and classified; the rest is discarded.
ERROR_BODY_BYTES = 64 * 1024


async def read_body(resp: aiohttp.ClientResponse, cap: int) -> tuple[bytes, bool]:
    """Up to ``cap`` bytes of the body, decompressed; True when there was more.

    aiohttp inflates a compressed body piece by piece as it is read, so a compression
    bomb costs no more than ``cap``.
    """
    parts: list[bytes] = []
    size = 0
    content = resp.content
    while True:
        piece = await content.readany()
        if not piece:
            return b"".join(parts), False
        size += len(piece)
        if size > cap:
            parts.append(piece[: len(piece) - (size - cap)])
            return b"".join(parts), True
        parts.append(piece)


async def read_answer(
    provider: Provider, resp: aiohttp.ClientResponse, translator: Translator
) -> tuple[Classified, Reply | None]:
    """Read a complete (non-stream or error) answer within its bound and judge it."""
    if resp.status >= 300:
        body, _ = await read_body(resp, ERROR_BODY_BYTES)  # classified from its start
        return judge_body(provider, resp, body, translator)
    cap = provider.settings.max_response_bytes
    body, more = await read_body(resp, cap)
    if more:
        return Classified(Outcome.BAD_RESPONSE, f"answer larger than {cap} bytes"), None
    return judge_body(provider, resp, body, translator)


def judge_body(
    provider: Provider, resp: aiohttp.ClientResponse, body: bytes, translator: Translator
) -> tuple[Classified, Reply | None]:
    """Classify a complete upstream response, in OpenAI's terms once ``translator`` has
    put it in them: a Reply for an answer or an upstream error (which the loop may pass
    on), None when the body is not a valid answer."""
    status = resp.status
    if 300 <= status < 400:  # redirects are never followed: the prompt stays where it was sent
        return Classified(Outcome.BAD_RESPONSE, f"redirect ({status}) not followed", status), None
    headers = translator.headers(resp.headers)
    if status >= 400:
        cap = provider.config.quota_reset_timeout  # no upstream keeps it open longer
        body = translator.error(status, body)
        cls = classify_response(status, body, headers, retry_cap=cap)
        # Maybe passed to the client as is, but for any secret the upstream quoted back.
        return cls, Reply(provider, cls.outcome, status, headers, provider.redact.data(body))
    try:
        body = translator.answer(body)
    except BadAnswer as e:
        return Classified(Outcome.BAD_RESPONSE, str(e), status), None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Classified(Outcome.BAD_RESPONSE, "response body is not JSON", status), None
    if not isinstance(parsed, dict):
        return Classified(Outcome.BAD_RESPONSE, "response body is not a JSON object", status), None
    if parsed.get("error") is not None:
        return classify_error_body(status, parsed), None
    usage = parsed.get("usage")
    reply = Reply(provider, Outcome.OK, status, headers, body, usage)
    return Classified(Outcome.OK, "", status), reply


async def hold(
    lease: Lease, resp: aiohttp.ClientResponse, request_id: str, translator: Translator
) -> tuple[Classified, StreamStart | None]:
    """Read a 2xx stream up to its first output event without showing the client anything.

    A vendor's stream reaches the stream state through ``translator.feed``, as OpenAI's
    SSE; an OpenAI-compatible one (no ``feed``) as it came.
    """
    provider = lease.provider
    if resp.content_type != translator.stream_type:
        body, _ = await read_body(resp, ERROR_BODY_BYTES)
        cls, _ = judge_body(provider, resp, body, translator)
        if cls.outcome is Outcome.OK:
            what = resp.headers.get("Content-Type", "")
            cls = Classified(
                Outcome.BAD_RESPONSE, f"expected a stream ({translator.stream_type}), got {what!r}"
            )
        return cls, None
    limit = provider.settings.max_held_bytes
    parser = SSEParser(provider.settings.max_event_bytes)
    state = StreamState(provider.name, request_id)
    held: list[bytes] = []
    held_bytes = 0
    content = resp.content
    feed = translator.feed
    loop = asyncio.get_running_loop()
    while not state.output:
        chunk = await content.readany()
        provider.last_byte = loop.time()
        judge_read(state, parser, feed, chunk, held)
        if state.failure is not None and not state.output:
            return state.failure, None
        held_bytes += len(chunk)
        if held_bytes > limit and not state.output:
            return Classified(Outcome.BAD_RESPONSE, f"no token in the first {limit} bytes"), None
    lease.commit()
    return Classified(Outcome.OK, "", resp.status), StreamStart(
        provider, lease, resp, parser, state, held, feed
    )


# -- the relay -----------------------------------------------------------------------


async def relay(
    request: web.Request, call: Call, start: StreamStart, resp: web.StreamResponse | None = None
) -> web.StreamResponse:
    """Commit ``start`` to the client and pipe the rest of the upstream stream.

    ``resp`` replaces the client's response: the cache's fan-out passes one that takes
    ``prepare``, ``write`` and ``write_eof`` for every client of a shared call.
    """
    provider = start.provider
    state = start.state
    call.answered_by = provider
    call.status = 200
    if resp is None:
        resp = web.StreamResponse(status=200, headers=sse_headers(call))
    outcome, detail = Outcome.CANCELLED, ""
    try:
        await resp.prepare(request)
        call.first_token_at = time.perf_counter()
        await _pipe(resp, call, start)
        if state.failure is not None:
            outcome = state.failure.outcome
            detail = provider.redact.text(state.failure.detail)
            call.result = f"cut:{outcome.value}"
        else:
            outcome = Outcome.OK
            call.result = Outcome.OK.value
        if state.done:
            await _drain(start.resp)  # the rescue's stream, if one took over
    except _ClientStalled:
        # It stopped reading: its connection is dropped (no write could reach it) and the
        # upstream generation stops; the provider did nothing wrong.
        call.result = "client_stalled"
        metrics.CLIENT_DISCONNECTS.inc()
        if request.transport is not None:
            request.transport.abort()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        _client_left(call)
    except asyncio.CancelledError as e:
        if e.args != (SHUTDOWN_REASON,):
            _client_left(call)
            raise
        # The client is still there: tell it why its stream ends here.
        asyncio.current_task().uncancel()  # type: ignore[union-attr]
        call.result = "shutdown"
        outcome = Outcome.CANCELLED
        message = "The gateway is shutting down; the answer is incomplete."
        try:
            async with asyncio.timeout(1):
                await resp.write(error_event(message, "server_error", "shutting_down"))
                await resp.write_eof()
        except (TimeoutError, ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
    finally:
        call.usage = state.usage
        start.lease.finish(outcome, detail)
        start.resp.close()  # a no-op when the body was read to its end (back in the pool)
    return resp


async def _drain(upstream: aiohttp.ClientResponse) -> None:
    """Read what follows ``[DONE]`` (the chunked terminator) so the connection is pooled."""
    content = upstream.content
    seen = 0
    try:
        async with asyncio.timeout(_DRAIN_SECONDS):
            while seen <= _DRAIN_BYTES:
                piece = await content.readany()
                if not piece:
                    return
                seen += len(piece)
    except (TimeoutError, aiohttp.ClientError, OSError):
        pass  # the connection is closed instead of pooled


class _ClientStalled(Exception):
    """The client did not take a write within ``send_timeout``."""


def stream_deadline(call: Call, settings: Settings) -> float:
    """When a committed stream must end: the client's own deadline if it chose one, else
    ``max_stream_duration`` from now (the request deadline bounds the wait for a first
    token, not a healthy generation)."""
    if call.deadline_chosen:
        return call.deadline
    return asyncio.get_running_loop().time() + settings.max_stream_duration


async def _pipe(resp: web.StreamResponse, call: Call, start: StreamStart) -> None:
    """Forward events until the stream ends; its failure, if any, is in the state."""
    provider = start.provider
    settings = provider.settings
    state = start.state
    parser = start.parser
    feed = start.feed  # None: OpenAI's SSE, whose bytes pass as they came
    content = start.resp.content
    loop = asyncio.get_running_loop()
    deadline = stream_deadline(call, settings)
    watchdog = _Watchdog(provider.config.idle_timeout, deadline)
    parts = start.held
    rescue = call.rescue
    if rescue is not None:
        rescue.begin(state, parts)  # from here on the stream state keeps the text sent
    try:
        while True:
            failure = state.failure
            if failure is not None and rescue is not None:
                if parts:  # what came before the failure is the client's, and in the transcript
                    await _write(resp, b"".join(parts), watchdog, settings.send_timeout, call)
                    parts = []

                def keepalive(data: bytes) -> Awaitable[None]:
                    return _write(resp, data, watchdog, settings.send_timeout, call)

                if await rescue.resume(call, start, deadline, keepalive):
                    provider = start.provider  # the rescue's stream goes on from here
                    parser, feed, content = start.parser, start.feed, start.resp.content
                    watchdog.idle = provider.config.idle_timeout
                    parts = start.held
                    continue
                failure = state.failure  # the stream ends as it would have without rescue
                rescue = None
            if failure is not None:
                detail = provider.redact.text(failure.detail)
                message = f"{provider.display_name} stream failed after the first token: {detail}"
                log.warning("%s [%s]", message, call.request_id)
                parts.append(error_event(message, code="stream_interrupted"))
            if parts:
                await _write(resp, b"".join(parts), watchdog, settings.send_timeout, call)
                parts = []
            if failure is not None or state.done:
                await _write(resp, None, watchdog, settings.send_timeout, call)
                return
            t0 = time.perf_counter()
            now = loop.time()
            chunk = b""
            if now >= deadline:
                state.fail(_DEADLINE)
            else:
                watchdog.watch(now, watchdog.idle)
                try:
                    chunk = await content.readany()
                    provider.last_byte = loop.time()
                except asyncio.CancelledError:
                    if not watchdog.fired:
                        raise
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                    state.fail(watchdog.reason())
                except (aiohttp.ClientError, OSError) as e:
                    state.fail(classify_exception(e))
                watchdog.since = None
            call.waited += time.perf_counter() - t0
            if state.failure is None:
                judge_read(state, parser, feed, chunk, parts)  # b"": the end of the body
    finally:
        watchdog.cancel()


async def _write(
    resp: web.StreamResponse,
    data: bytes | None,
    watchdog: _Watchdog,
    send_timeout: float,
    call: Call,
) -> None:
    """One write to the client (``None``: the end of the body), bounded by ``send_timeout``."""
    t0 = time.perf_counter()
    watchdog.watch(watchdog.loop.time(), send_timeout)
    try:
        if data is None:
            await resp.write_eof()
        else:
            await resp.write(data)
    except asyncio.CancelledError:
        if not watchdog.fired:
            raise
        asyncio.current_task().uncancel()  # type: ignore[union-attr]
        raise _ClientStalled from None
    finally:
        watchdog.since = None
    blocked = time.perf_counter() - t0
    if blocked > 0.001:  # waited for a slow client to drain: not the gateway's cost
        call.waited += blocked


_DEADLINE = Classified(Outcome.DEADLINE, "request deadline reached")


class _Watchdog:
    """Cancels the relay's task when a read or a write waits too long, or at the deadline.

    One timer per stream instead of an ``asyncio.timeout`` per read (about 5 us each): a
    read or write only stamps :attr:`since` and its :attr:`limit`.
    """

    __slots__ = (
        "_deadline",
        "_handle",
        "_task",
        "_when",
        "fired",
        "idle",
        "limit",
        "loop",
        "since",
    )

    def __init__(self, idle: float, deadline: float) -> None:
        self.loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self.idle = idle
        self._deadline = deadline
        self.since: float | None = None  # loop time at which the pending read/write began
        self.limit = idle  # how long the pending read/write may take
        self.fired = False
        self._when = min(self.loop.time() + idle, deadline)
        self._handle = self.loop.call_at(self._when, self._check)

    def watch(self, since: float, limit: float) -> None:
        """A read or write begins at loop time ``since`` and may take ``limit`` seconds."""
        self.since = since
        self.limit = limit
        when = since + limit
        if when < self._when:  # a shorter bound than the timer's: look earlier
            self._handle.cancel()
            self._when = when
            self._handle = self.loop.call_at(when, self._check)

    def _check(self) -> None:
        now = self.loop.time()
        since = self.since
        if since is None:  # between reads: look again later (a read checks the deadline)
            when = min(now + self.idle, self._deadline)
            if when <= now:
                when = now + self.idle
        else:
            when = min(since + self.limit, self._deadline)
            if now >= when:
                self.fired = True
                assert self._task is not None
                self._task.cancel()
                return
        self._when = when
        self._handle = self.loop.call_at(when, self._check)

    def reason(self) -> Classified:
        """Why a read was stopped: the stream's deadline (not the provider's fault), or idling."""
        if self.loop.time() >= self._deadline:
            return _DEADLINE
        return Classified(Outcome.TIMEOUT, f"no event for {self.idle:g}s")

    def cancel(self) -> None:
        """Stop watching."""
        self._handle.cancel()


def _client_left(call: Call) -> None:
    call.result = Outcome.CANCELLED.value
    metrics.CLIENT_DISCONNECTS.inc()
