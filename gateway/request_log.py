"""What a finished request leaves behind: its metrics and its one log line.

The log line is written by :class:`RequestLog`. Under ``python -m gateway`` it goes
straight to the log stream, built with one format and a timestamp prefix kept per second,
buffered and written once per event-loop turn: no ``logging`` record, formatter or handler
lock per request (about a fifth of a plain request's CPU otherwise). Elsewhere (tests, an
application embedding the gateway) it goes through ``logging`` like every other line. The
format is the same either way:
``2026-11-27 17:47:05,123 INFO gateway: request id=... model=... provider=...``, ending
with ``worker=PID`` (the process that served it, one of several under ``--workers``);
client strings in it are escaped, and nothing is built when INFO is off.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, TextIO

from gateway import budgets, metrics
from gateway.call import Call
from gateway.errors import token_count
from gateway.logsafe import escape
from gateway.status import StatusRecorder

if TYPE_CHECKING:
    from gateway.rescue import Rescue

log = logging.getLogger("gateway")

#: The most bytes a write to a pipe may carry and stay whole among other processes'
#: writes (PIPE_BUF): workers share their supervisor's output.
_ATOMIC = 4096


class RequestLog:
    """Writes request lines: through ``logging``, or straight to a stream once attached."""

    __slots__ = ("_logger", "_pending", "_prefix", "_second", "_stream", "worker")

    def __init__(self, logger: logging.Logger = log) -> None:
        self._logger = logger
        self._stream: TextIO | None = None
        self._pending: list[str] = []
        self._second = -1
        self._prefix = ""
        self.worker = f" worker={os.getpid()}"  # the line's last field

    def attach(self, stream: TextIO) -> None:
        """Write lines to ``stream`` directly, in the format of the root handler."""
        self._stream = stream

    @property
    def enabled(self) -> bool:
        """True when request lines are logged (INFO on)."""
        return self._logger.isEnabledFor(logging.INFO)

    def write(self, line: str) -> None:
        """Log ``line`` (already safe: client strings escaped) at INFO."""
        stream = self._stream
        if stream is None:
            self._logger.info("%s", line)
            return
        now = time.time()
        second = int(now)
        if second != self._second:  # logging's asctime, made once a second
            self._second = second
            self._prefix = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        millis = int((now - second) * 1000)
        self._pending.append(f"{self._prefix},{millis:03d} INFO gateway: {line}\n")
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write the buffered lines (once per loop turn, and at shutdown), in writes of at
        most :data:`_ATOMIC` bytes of whole lines: workers share the log's pipe, and the
        kernel keeps such a write whole."""
        if not self._pending or self._stream is None:
            return
        lines, self._pending = self._pending, []
        try:
            chunk: list[str] = []
            size = 0
            for line in lines:
                length = len(line) if line.isascii() else len(line.encode())
                if size + length > _ATOMIC and chunk:
                    self._write("".join(chunk))
                    chunk, size = [], 0
                chunk.append(line)
                size += length
            self._write("".join(chunk))
        except (OSError, ValueError):  # a closed or broken log stream: like logging, go on
            pass

    def _write(self, text: str) -> None:
        assert self._stream is not None
        self._stream.write(text)
        self._stream.flush()


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def finish(
    call: Call, known: frozenset[str], request_log: RequestLog, recorder: StatusRecorder
) -> None:
    """Metrics, the budget correction, the one log line and the status page's record of a
    finished request."""
    if call.token_charges:
        budgets.settle(call)  # the estimate, corrected from the answer's usage
    elapsed = time.perf_counter() - call.started
    provider = call.provider_name
    model = metrics.model_label(call.model, known)
    stream = "true" if call.stream else "false"
    status = str(call.status or 499)
    metrics.REQUESTS.labels(model, provider, status, stream).inc()
    metrics.REQUEST_DURATION.labels(model, provider, stream).observe(elapsed)
    metrics.OVERHEAD.observe(max(0.0, elapsed - call.waited))
    result = call.result
    if result.startswith("cut:"):  # set by the relay: failed after commit
        metrics.STREAM_INTERRUPTIONS.labels(provider, result[4:]).inc()
    ttft = "-"
    if call.first_token_at is not None:
        first = call.first_token_at - call.started
        metrics.TTFT.labels(provider).observe(first)
        ttft = f"{first * 1000:.1f}"
    tokens = "-"
    usage = call.usage
    # After a rescue the usage is that of the provider the stream came from last.
    rescue = call.rescue
    source = rescue.source.name if rescue is not None and rescue.source is not None else provider
    if isinstance(usage, dict):
        prompt = token_count(usage.get("prompt_tokens"))
        completion = token_count(usage.get("completion_tokens"))
        if prompt is not None:
            metrics.TOKENS.labels(source, "prompt").inc(prompt)
        if completion is not None:
            metrics.TOKENS.labels(source, "completion").inc(completion)
        if prompt is not None or completion is not None:
            tokens = f"{_or_dash(prompt)}/{_or_dash(completion)}"
    if call.cache:
        metrics.CACHE_REQUESTS.labels(call.cache).inc()
    recorder.record(call, model, elapsed)
    if not request_log.enabled:
        return
    chain = ">".join([f"{r.provider.name}:{r.outcome.value}" for r in call.records])
    # A request that ended while an upstream had not answered says which, for how long.
    waiting = (
        f" waiting_on={call.waiting_on} waited_ms={call.waited_for * 1000:.0f}"
        if call.waiting_on
        else ""
    )
    request_log.write(
        f"request id={call.request_id} model={escape(call.model, 100)} stream={stream} "
        f"provider={provider} status={status} outcome={result or 'none'} "
        f"attempts={len(call.records)} chain={chain} latency_ms={elapsed * 1000:.1f} "
        f"ttft_ms={ttft} tokens={tokens}{waiting}{_cache_fields(call)}"
        f"{_rescue_fields(rescue)}{request_log.worker}"
    )


def _rescue_fields(rescue: Rescue | None) -> str:
    """How many restarts a stream's rescue made, and who finished the stream."""
    if rescue is None or not rescue.used:
        return ""
    by = f" rescued_by={rescue.source.name}" if rescue.source is not None else ""
    return f" rescues={rescue.used}{by}"


def _cache_fields(call: Call) -> str:
    if not call.cache:
        return ""
    # On a hit, who produced the stored answer.
    source = f" source={call.cache_source}" if call.cache_source else ""
    return f" cache={call.cache}{source}"
