"""Rescuing a stream that failed after its first token: restart it, check it, splice it.

A stream's request may ask for a rescue (``[rescue.models]`` for its model or alias, or
``x-gateway-rescue: on``). Its stream state then keeps the text the client has received
(:class:`~gateway.transcript.Transcript`), and when the stream fails after commit (a cut,
a stall past ``idle_timeout``, an error event) the relay asks :meth:`Rescue.resume` before
it ends the stream:

* the same request is sent again, through the failover loop, to the providers after the
  one that failed (then to that one, while its ``max_retries`` allow), as ``restart``
  (nothing changed) or, with ``prefill``, with the partial answer as a last assistant
  message, which a provider that refuses it (a 400 about the last message) turns into a
  restart: the 400 is never the client's;
* a restarted stream is held and compared, choice by choice, with what the client has
  (:class:`~gateway.transcript.Splice`): once it has reproduced all of it, the rest goes
  on in the client's stream, with the original ``id``, ``model`` and ``created``; if it
  says anything else first, the stream ends with the error event it would have had;
* meanwhile the client gets an SSE comment every ``keepalive`` seconds, and a client that
  leaves cancels every upstream request of the rescue.

At most ``max_rescues`` restarts per stream, within the stream's deadline; the text kept
and held is bounded by ``max_prefix_bytes``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import aiohttp
import orjson

from gateway import metrics
from gateway.call import Call, Reply, StreamStart
from gateway.config import RescueSettings
from gateway.errors import POLICY, Classified, GatewayError, Outcome, classify_exception
from gateway.failover import run
from gateway.routing import Route
from gateway.sse import DONE, SSEParser
from gateway.stream import StreamState, judge_read
from gateway.transcript import Splice, Transcript
from gateway.upstream import Provider

log = logging.getLogger("gateway")

HEADER = "x-gateway-rescue"
_KEEPALIVE = b": the gateway is rescuing this stream\n\n"
_DEADLINE = Classified(Outcome.DEADLINE, "request deadline reached")


def plan(
    headers: Mapping[str, str],
    call: Call,
    settings: RescueSettings,
    routes: Sequence[Route[Provider]],
) -> Rescue | None:
    """How ``call``'s stream may be rescued, if it may: ``x-gateway-rescue`` (``on`` or
    ``off``) over the rule for its model or alias. A bad header raises a 400."""
    given = headers.get(HEADER)
    rule = settings.models.get(call.model, "off")
    if given is not None:
        value = given.strip().lower()
        if value not in ("on", "off"):
            raise GatewayError(400, f"{HEADER} must be on or off.", code="invalid_rescue_mode")
        if value == "off":
            return None
        if rule == "off":
            rule = "restart"
    if rule == "off" or not call.stream:
        return None
    return Rescue(rule, settings, list(routes))


class Rescue:
    """One stream's rescues: how (``restart`` or ``prefill``), where, how many so far."""

    __slots__ = ("mode", "routes", "settings", "source", "used")

    def __init__(self, mode: str, settings: RescueSettings, routes: list[Route[Provider]]) -> None:
        self.mode = mode
        self.settings = settings
        self.routes = routes
        self.used = 0  # restarts so far
        self.source: Provider | None = None  # the provider the stream came from last

    def begin(self, state: StreamState, held: list[bytes]) -> None:
        """At commit: the stream state keeps, from the events the client gets first on,
        the text a rescue must reproduce."""
        transcript = Transcript(self.settings.max_prefix_bytes)
        for event in _events(held):
            if event.data is not None and event.data != DONE:
                obj = orjson.loads(event.data)  # judged by the hold already: valid JSON
                if isinstance(obj, dict):
                    transcript.record(obj)
        state.transcript = transcript

    async def resume(
        self,
        call: Call,
        start: StreamStart,
        deadline: float,
        keepalive: Callable[[bytes], Awaitable[None]],
    ) -> bool:
        """``start``'s stream failed after commit (its state says how): True when a
        restarted stream has reproduced what the client has and now stands in ``start``
        for the rest; False when the stream ends with ``start.state.failure``."""
        state = start.state
        failure = state.failure
        transcript = state.transcript
        if failure is None or transcript is None or not POLICY[failure.outcome].fail_over:
            return False  # a deadline, a refusal: no other provider may answer either
        provider = start.provider
        start.lease.finish(failure.outcome, provider.redact.text(failure.detail))
        start.resp.close()
        if transcript.broken:
            metrics.STREAM_RESCUES.labels("skipped").inc()
            log.info("stream not rescued: %s [%s]", transcript.broken, call.request_id)
            return False
        loop = asyncio.get_running_loop()
        if self.used >= self.settings.max_rescues or loop.time() >= deadline:
            return False
        log.warning(
            "%s stream failed after the first token (%s): restarting it to rescue it [%s]",
            provider.display_name,
            provider.redact.text(failure.detail),
            call.request_id,
        )
        task = asyncio.create_task(self._regenerate(call, start, deadline))
        try:
            await keepalive(_KEEPALIVE)
            while not task.done():
                await asyncio.wait({task}, timeout=self.settings.keepalive)
                if not task.done():
                    await keepalive(_KEEPALIVE)
        finally:
            if not task.done():  # the client left (or stalled): every upstream request ends
                task.cancel()
                await asyncio.wait({task}, timeout=5)
        new = task.result()
        if new is None:
            state.failure = failure
            return False
        start.provider, start.lease, start.resp = new.provider, new.lease, new.resp
        start.parser, start.feed, start.held = new.parser, new.feed, new.held
        return True

    async def _regenerate(
        self, call: Call, start: StreamStart, deadline: float
    ) -> StreamStart | None:
        """Restart the request until one stream reproduces the text sent (returned, its
        ``held`` what the client gets next), one diverges, or no restart is left."""
        state = start.state
        routes = self._routes(start.provider)
        saved = call.deadline, call.first_route
        call.deadline = deadline  # the committed stream's: the rescue lives within it
        loop = asyncio.get_running_loop()
        try:
            while self.used < self.settings.max_rescues and loop.time() < deadline:
                self.used += 1
                new, prefilled = await self._restart(call, routes, state)
                if new is None:
                    metrics.STREAM_RESCUES.labels("failed").inc()
                    return None
                out: list[bytes] = []
                try:
                    verified = await self._verify(call, new, state, prefilled, out)
                except BaseException:  # the client left: given back without a verdict
                    new.lease.finish(Outcome.CANCELLED)
                    new.resp.close()
                    raise
                if not verified:
                    new.resp.close()
                name = new.provider.display_name
                if verified:
                    self.source = new.provider
                    metrics.STREAM_RESCUES.labels("continued" if prefilled else "rescued").inc()
                    how = "continued the partial answer" if prefilled else "reproduced the text"
                    log.info("stream rescued: %s %s [%s]", name, how, call.request_id)
                    new.held = out
                    return new
                splice = state.transcript.splice  # type: ignore[union-attr]
                if splice is not None and splice.diverged:
                    new.lease.finish(Outcome.CANCELLED)  # a good stream, of another answer
                    metrics.STREAM_RESCUES.labels("diverged").inc()
                    log.warning(
                        "stream not rescued: %s's answer differs (%s) [%s]",
                        name,
                        splice.diverged,
                        call.request_id,
                    )
                    return None
                failed = state.failure or _DEADLINE
                new.lease.finish(failed.outcome, new.provider.redact.text(failed.detail))
                metrics.STREAM_RESCUES.labels("failed").inc()
                log.warning(
                    "stream not rescued: %s failed before it reproduced the text sent (%s) [%s]",
                    name,
                    new.provider.redact.text(failed.detail),
                    call.request_id,
                )
                routes = [r for r in routes if r.provider is not new.provider]
            return None
        finally:
            call.deadline, call.first_route = saved

    def _routes(self, failed: Provider) -> list[Route[Provider]]:
        """The providers after ``failed`` in the chain, then ``failed`` itself while its
        ``max_retries`` allow a retry."""
        routes = self.routes
        at = next((i for i, r in enumerate(routes) if r.provider is failed), None)
        if at is None:
            return list(routes)
        after = routes[at + 1 :]
        return [*after, routes[at]] if failed.config.max_retries > 0 else after

    async def _restart(
        self, call: Call, routes: list[Route[Provider]], state: StreamState
    ) -> tuple[StreamStart | None, bool]:
        """A new stream of ``call`` with its first token, and whether it continues a
        prefill; a refused prefill becomes a restart."""
        body = None
        if self.mode == "prefill" and state.transcript is not None:
            body = _prefilled(call, state.transcript)
        if body is not None:
            saved = call.body, call.raw
            call.body, call.raw = body, orjson.dumps(body)
            try:
                answer = await _answer(call, routes)
            finally:
                call.body, call.raw = saved
            if isinstance(answer, StreamStart):
                return answer, True
            if not isinstance(answer, Reply):
                return None, True
            log.info(
                "%s refused the assistant prefill (%d); restarting the request instead [%s]",
                answer.provider.display_name,
                answer.status,
                call.request_id,
            )
        answer = await _answer(call, routes)
        return (answer if isinstance(answer, StreamStart) else None), False

    async def _verify(
        self,
        call: Call,
        new: StreamStart,
        state: StreamState,
        prefilled: bool,
        out: list[bytes],
    ) -> bool:
        """Read ``new`` through the state's splice until it has reproduced the text sent
        (True; what goes on to the client is in ``out``), diverged, or failed, within
        ``call``'s deadline (the stream's, meanwhile)."""
        transcript = state.transcript
        assert transcript is not None
        splice = transcript.splice = Splice(transcript, verify=not prefilled)
        state.failure = None
        state.take(_events(new.held), out)  # what its hold read, judged again as the client's
        content = new.resp.content
        idle = new.provider.config.idle_timeout
        deadline = call.deadline
        loop = asyncio.get_running_loop()
        while not (splice.verified or splice.diverged or state.failure or state.done):
            now = loop.time()
            if now >= deadline:
                state.fail(_DEADLINE)
                break
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(min(idle, deadline - now)):
                    chunk = await content.readany()
            except TimeoutError:
                late = loop.time() >= deadline
                idled = Classified(Outcome.TIMEOUT, f"no event for {idle:g}s")
                state.fail(_DEADLINE if late else idled)
                break
            except (aiohttp.ClientError, OSError) as e:
                state.fail(classify_exception(e))
                break
            finally:
                call.waited += time.perf_counter() - t0  # waiting on the upstream
            new.provider.last_byte = loop.time()
            judge_read(state, new.parser, new.feed, chunk, out)
        return splice.verified and not splice.diverged


def _prefilled(call: Call, transcript: Transcript) -> dict[str, Any] | None:
    """``call``'s body with the partial answer as a last assistant message, when that is
    the plain text of one chat choice; None otherwise (then it is restarted and verified)."""
    body = call.body
    if call.endpoint != "chat/completions" or body.get("n") not in (None, 1):
        return None
    texts = transcript.sent()
    if set(texts) != {0} or set(texts[0]) != {"content"} or transcript.choices != {0}:
        return None
    partial = {"role": "assistant", "content": texts[0]["content"]}
    return {**body, "messages": [*body["messages"], partial]}


async def _answer(call: Call, routes: list[Route[Provider]]) -> StreamStart | Reply | None:
    """The failover loop's answer, None when no provider answered (never the client's)."""
    try:
        return await run(call, routes)
    except GatewayError:
        return None


def _events(held: list[bytes]) -> list[Any]:
    """The events in ``held`` (whole events, as a stream state passed them on)."""
    raw = b"".join(held)
    return SSEParser(len(raw) + 1).feed(raw)
