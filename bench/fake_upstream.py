"""A fast fake OpenAI-compatible upstream for the benchmark, on loopback.

It is a raw :mod:`asyncio` protocol with a minimal HTTP/1.1 parser rather than an aiohttp
server, so that it costs a few tens of microseconds per request and is never the
bottleneck of what it measures. Every response is encoded once, at start-up.

Routes (any path may carry a mode prefix, e.g. ``/429/v1/chat/completions``):

* ``GET /v1/models``: an OpenAI model list with ``--model``;
* ``POST /v1/chat/completions``: ``stream: false`` answers a small ``chat.completion``;
  ``stream: true`` answers SSE: a role-only chunk, N content chunks, a ``finish_reason``
  chunk and ``data: [DONE]``, in chunked transfer encoding;
* prefix ``/429``: every POST answers 429 with OpenAI's ``rate_limit_exceeded`` error
  body and no ``Retry-After`` (``GET .../models`` still answers 200, so that health
  probes keep the provider's breaker closed).

The request body may carry two extra fields that OpenAI-compatible servers ignore and
that a gateway forwards untouched: ``bench_chunks`` (content chunks in a stream, default
``--chunks``) and ``bench_interval_ms`` (pause between chunks; 0, the default, writes
them back to back, one ``write()`` per event).

Run: ``python bench/fake_upstream.py --port 9100 [--chunks 50]``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import orjson

CREATED = 1_700_000_000
_REASONS = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed", 429: b"Too Many Requests"}


def _response(status: int, body: bytes, ctype: bytes = b"application/json") -> bytes:
    head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
        b"x-ratelimit-limit-requests: 10000\r\n\r\n"
    ) % (status, _REASONS[status], ctype, len(body))
    return head + body


def _frame(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _chunk(model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench0123456789",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


class Canned:
    """Every byte string the server sends, built once."""

    def __init__(self, model: str, chunks: int) -> None:
        self.chunks = chunks
        self.models = _response(
            200,
            orjson.dumps(
                {
                    "object": "list",
                    "data": [
                        {"id": model, "object": "model", "created": CREATED, "owned_by": "bench"}
                    ],
                }
            ),
        )
        completion = {
            "id": "chatcmpl-bench0123456789",
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_bench",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
        }
        self.completion = _response(200, orjson.dumps(completion))
        rate_limited = {
            "error": {
                "message": (
                    f"Rate limit reached for {model} in organization org-bench on requests "
                    "per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s."
                ),
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        }
        self.rate_limited = _response(429, orjson.dumps(rate_limited))
        self.not_found = _response(
            404,
            orjson.dumps(
                {
                    "error": {
                        "message": "Not found",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                }
            ),
        )
        self.stream_head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        self.role = _frame(_sse(_chunk(model, {"role": "assistant", "content": ""}, None)))
        self.token = _frame(_sse(_chunk(model, {"content": " token"}, None)))
        self.finish = _frame(_sse(_chunk(model, {}, "stop")))
        self.done = _frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: keep-alive HTTP/1.1, one request at a time."""

    def __init__(self, canned: Canned) -> None:
        self.canned = canned
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.streaming: asyncio.Task[None] | None = None
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None:
            self.streaming.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.streaming is None:
            self._serve()

    def _serve(self) -> None:
        """Answer every complete request in the buffer (stops while a stream runs)."""
        buf = self.buf
        while self.transport is not None and self.streaming is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).split(b"\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    self.close_after = True
            if len(buf) < end + 4 + length:
                return
            body = bytes(buf[end + 4 : end + 4 + length])
            del buf[: end + 4 + length]
            method, _, rest = head[0].partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            self._handle(method, path, body)
            if self.close_after and self.streaming is None and self.transport is not None:
                self.transport.close()

    def _handle(self, method: bytes, path: bytes, body: bytes) -> None:
        canned = self.canned
        transport = self.transport
        assert transport is not None
        limited = path.startswith(b"/429/")
        if limited:
            path = path[4:]
        if path == b"/v1/models" and method == b"GET":
            transport.write(canned.models)
            return
        if path != b"/v1/chat/completions" or method != b"POST":
            transport.write(canned.not_found)
            return
        if limited:
            transport.write(canned.rate_limited)
            return
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            req = {}
        if not isinstance(req, dict) or not req.get("stream"):
            transport.write(canned.completion)
            return
        chunks = int(req.get("bench_chunks", canned.chunks))
        interval = float(req.get("bench_interval_ms", 0)) / 1000
        if interval <= 0:
            transport.write(canned.stream_head + canned.role)
            for _ in range(chunks):
                transport.write(canned.token)  # one write (one send) per event
            transport.write(canned.finish)
            transport.write(canned.done)
            return
        self.streaming = asyncio.get_running_loop().create_task(self._paced(chunks, interval))

    async def _paced(self, chunks: int, interval: float) -> None:
        canned = self.canned
        try:
            transport = self.transport
            assert transport is not None
            transport.write(canned.stream_head + canned.role + canned.token)
            for _ in range(chunks - 1):
                await asyncio.sleep(interval)
                if self.transport is None:
                    return
                transport.write(canned.token)
            await asyncio.sleep(interval)
            if self.transport is None:
                return
            transport.write(canned.finish + canned.done)
        finally:
            self.streaming = None
        if self.close_after and self.transport is not None:
            self.transport.close()
        elif self.buf:
            self._serve()


async def serve(host: str, port: int, model: str, chunks: int) -> None:
    """Serve until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    canned = Canned(model, chunks)
    server = await loop.create_server(
        lambda: UpstreamProtocol(canned), host, port, backlog=1024, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"fake upstream on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--model", default="gpt-bench")
    parser.add_argument("--chunks", type=int, default=50, help="content chunks per stream")
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        parser.error("the fake upstream listens on loopback only")
    asyncio.run(serve(args.host, args.port, args.model, args.chunks))


if __name__ == "__main__":
    main()
