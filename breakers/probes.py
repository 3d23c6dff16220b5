"""Background health probes: a model list (``GET {base}/models``, or what the provider's
API lists models at) feeding a breaker and the set of models the provider serves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
import orjson

from breakers.breaker import STALLED_KIND, Cause, ProviderBreaker

log = logging.getLogger("breakers.probes")

_MAX_BODY = 8 << 20  # a model list with details for hundreds of models fits easily


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one probe saw."""

    at: float  # wall-clock seconds
    latency: float
    error: str | None
    models: frozenset[str] | None  # None when the probe failed
    inconclusive: bool = False  # timed out while the provider was busy: not counted
    refused: bool = False  # the connection was refused: the provider is off
    stalled: bool = False  # timed out while requests there waited and got no byte


class Prober:
    """Polls one provider's model list every ``interval`` seconds (jittered by +-20%).

    A failed probe is one breaker failure, and a refused connection (the provider is
    switched off) opens the breaker at once; a good probe lets an open breaker go
    half-open and records which models are loaded. A probe that times out while
    ``progress(sent)`` says requests in flight there still got bytes since the probe was sent
    is not counted (busy); one while they got none counts as a stall. ``on_result`` sees
    every result (for metrics). ``parse`` reads the model list (OpenAI's
    ``{"data": [{"id": ...}]}`` by default); after a good probe, ``running_url`` (native
    Ollama's ``/api/ps``) is listed into :attr:`running`, which informs and judges nothing.

    Several processes watching one provider need not all probe it: ``gate`` (awaited
    before each probe) says whether this one probes this time, ``publish`` hands each
    result it measured to the others, and they feed theirs with :meth:`apply`.
    """

    def __init__(
        self,
        name: str,
        session: aiohttp.ClientSession,
        url: str,
        breaker: ProviderBreaker,
        *,
        interval: float = 10.0,
        timeout: float = 2.0,
        headers: Mapping[str, str] | None = None,
        on_result: Callable[[ProbeResult], None] | None = None,
        progress: Callable[[float], bool | None] | None = None,
        parse: Callable[[bytes], frozenset[str] | None] | None = None,
        running_url: str | None = None,
        gate: Callable[[], Awaitable[bool]] | None = None,
        publish: Callable[[ProbeResult], None] | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self.running_url = running_url
        # The models in memory (from running_url, native Ollama's /api/ps), after a good
        # probe; None when unknown.
        self.running: frozenset[str] | None = None
        self._parse = parse or model_ids
        self.breaker = breaker
        self.interval = interval
        self.timeout = timeout
        self.last: ProbeResult | None = None
        self.models: frozenset[str] | None = None
        self._session = session
        self._headers = dict(headers or {})
        self._on_result = on_result
        self._progress = progress
        self._gate = gate
        self._publish = publish
        self._task: asyncio.Task[None] | None = None
        self.first = asyncio.Event()  # set once the first probe has a result

    async def probe_once(self) -> ProbeResult:
        """Probe now, feed the breaker, and return what was seen."""
        sent = asyncio.get_running_loop().time()
        start = time.perf_counter()
        error: str | None = None
        models: frozenset[str] | None = None
        refused = timed_out = False
        try:
            async with self._session.get(
                self.url,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,  # a model list elsewhere says nothing of this provider
            ) as resp:
                body = await resp.content.read(_MAX_BODY + 1)
            if resp.status != 200:
                error = f"HTTP {resp.status}"
            elif len(body) > _MAX_BODY:
                error = f"model list larger than {_MAX_BODY} bytes"
            else:
                models = self._parse(body)
                if models is None:
                    error = "invalid model list"
        except TimeoutError:
            error = f"timed out after {self.timeout:g}s"
            timed_out = True
        except aiohttp.ClientConnectorError as e:
            error = connect_failure(e)
            refused = True
        except aiohttp.ClientError as e:
            error = f"{type(e).__name__}: {e}"
        except OSError as e:
            error = f"{type(e).__name__}: {e.strerror or e}"
        if error is None and self.running_url is not None:
            self.running = await self._running(self.running_url)
        # Single-slot servers (llama.cpp) answer the model list only between generations:
        # a slow probe while requests there still get bytes back says nothing about its
        # health (busy). A slow probe while requests wait and none gets a byte is a hung
        # server (stalled), and counts.
        progress = self._progress(sent) if timed_out and self._progress is not None else None
        result = ProbeResult(
            time.time(),
            time.perf_counter() - start,
            error,
            models,
            inconclusive=progress is True,
            refused=refused,
            stalled=progress is False,
        )
        self.apply(result)
        if self._publish is not None:
            self._publish(result)
        return result

    def apply(self, result: ProbeResult, feed: bool = True) -> None:
        """Take ``result``, measured here or by another process watching the same
        provider: its model list, and (``feed``) its verdict for the breaker. A result
        that is not news (told to a process that joined later) only informs."""
        self.last = result
        error = result.error
        if error is None:
            self.models = result.models
            if feed:
                self.breaker.probe_succeeded()
        elif feed and not result.inconclusive:
            if result.stalled:
                cause = Cause(STALLED_KIND, f"{error}, and no byte from it on any request since")
            else:
                cause = Cause("unreachable" if result.refused else "probe failed", error)
            self.breaker.probe_failed(unreachable=result.refused, cause=cause)
        if self._on_result is not None:
            self._on_result(result)
        self.first.set()

    async def _running(self, url: str) -> frozenset[str] | None:
        """The models in memory, or None when the list cannot be had: it informs, it does
        not judge the provider's health."""
        try:
            async with self._session.get(
                url,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as resp:
                body = await resp.content.read(_MAX_BODY + 1)
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None
        if resp.status != 200 or len(body) > _MAX_BODY:
            return None
        return self._parse(body)

    def start(self) -> None:
        """Start polling in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"probe-{self.name}")

    async def stop(self) -> None:
        """Stop polling; no probe is sent after this returns."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                if self._gate is None or await self._gate():
                    await self.probe_once()
            except Exception:  # a probe bug must not end probing for good
                log.exception("probe of %s failed unexpectedly", self.name)
            await asyncio.sleep(self.interval * random.uniform(0.8, 1.2))


def connect_failure(exc: aiohttp.ClientConnectorError) -> str:
    """``cannot connect to localhost:1234: Connection refused``, whatever the OS wording."""
    err = exc.os_error
    reason = os.strerror(err.errno) if err.errno else (err.strerror or str(err) or "failed")
    return f"cannot connect to {exc.host}:{exc.port}: {reason}"


def model_ids(body: bytes) -> frozenset[str] | None:
    """Model ids from an OpenAI-style ``{"data": [{"id": ...}]}`` list (Anthropic's too)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    data = parsed.get("data") if isinstance(parsed, dict) else None
    if not isinstance(data, list):
        return None
    return frozenset(str(m["id"]) for m in data if isinstance(m, dict) and "id" in m)
