"""What the client receives: the gateway's headers, and complete upstream answers."""

from __future__ import annotations

import asyncio

from aiohttp import web
from multidict import CIMultiDictProxy

from gateway.call import Call, Reply
from gateway.config import Settings
from gateway.errors import GatewayError

#: The cancel message with which a graceful shutdown ends requests past their grace.
SHUTDOWN_REASON = "gateway shutting down"

# Upstream headers a client may see: timing and version, and (a setting) rate limits.
# openai-organization and openai-project describe the operator's account: never passed.
_PASSED = frozenset({"openai-processing-ms", "openai-version"})
_RATELIMIT_PREFIX = "x-ratelimit-"
# Bodies up to this size fit the transport's buffers, so writing them cannot block; larger
# ones are written under send_timeout, so a client that stops reading cannot hold them.
_BUFFERED_BODY = 64 * 1024
_SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def gateway_headers(call: Call) -> dict[str, str]:
    """The ``x-gateway-*`` and ``x-request-id`` headers for ``call``'s response."""
    headers = {
        "x-gateway-provider": call.provider_name,
        "x-gateway-attempts": str(len(call.records)),
        "x-gateway-failover": "true" if call.failover else "false",
        "x-request-id": call.request_id,
    }
    if call.cache:
        headers["x-gateway-cache"] = call.cache
    return headers


def sse_headers(call: Call) -> dict[str, str]:
    """Headers of a committed stream."""
    headers = dict(_SSE_HEADERS)
    headers.update(gateway_headers(call))
    return headers


def _passed_headers(upstream: CIMultiDictProxy[str], ratelimit: bool) -> dict[str, str]:
    """Upstream headers worth keeping; hop-by-hop, length and encoding are dropped
    (aiohttp has already decompressed the body)."""
    headers = {"Content-Type": upstream.get("Content-Type", "application/json")}
    for name, value in upstream.items():
        low = name.lower()
        if low in _PASSED or (ratelimit and low.startswith(_RATELIMIT_PREFIX)):
            headers[name] = value
    return headers


async def send_reply(
    request: web.Request, call: Call, reply: Reply, settings: Settings
) -> web.StreamResponse:
    """The client's response for a complete upstream answer, body untouched.

    A body too large for the transport's buffers is written here, under
    ``send_timeout``: a client that stops reading loses its connection instead of
    holding the body in memory for ever.
    """
    call.answered_by = reply.provider
    call.status = reply.status
    call.usage = reply.usage
    call.result = reply.outcome.value
    headers = _passed_headers(reply.headers, settings.pass_ratelimit_headers)
    headers.update(gateway_headers(call))
    return await send_body(request, call, reply.status, headers, reply.body, settings)


async def send_body(
    request: web.Request,
    call: Call,
    status: int,
    headers: dict[str, str],
    body: bytes,
    settings: Settings,
) -> web.StreamResponse:
    """A response with a body known in full: one write, under ``send_timeout`` when the
    body is too large for the transport's buffers."""
    if len(body) <= _BUFFERED_BODY:
        return web.Response(status=status, body=body, headers=headers)
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = len(body)
    try:
        async with asyncio.timeout(settings.send_timeout):
            await resp.prepare(request)
            await resp.write(body)
            await resp.write_eof()
    except TimeoutError:
        call.result = "client_stalled"
        if request.transport is not None:
            request.transport.abort()
    return resp


def error_response(call: Call, error: GatewayError) -> web.Response:
    """``error`` as ``call``'s response; its status and code go to the request's log line."""
    call.status = error.status
    call.result = error.code or "error"
    return error.response(gateway_headers(call))


def shutdown_response(call: Call) -> web.Response:
    """The 503 of a request that a graceful shutdown ended before its answer began."""
    resp = error_response(call, shutting_down())
    call.result = "shutdown"
    return resp


def shutting_down() -> GatewayError:
    """The error of a request that a graceful shutdown ends before its answer begins."""
    return GatewayError(
        503,
        "The gateway is shutting down; retry the request.",
        type_="server_error",
        code="shutting_down",
        retry_after=1,
    )
