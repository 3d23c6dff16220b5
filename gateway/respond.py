"""What the client receives: the gateway's headers, and complete upstream answers."""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDictProxy

from gateway.call import Call, Reply

#: The cancel message with which a graceful shutdown ends requests past their grace.
SHUTDOWN_REASON = "gateway shutting down"

_PASSED_PREFIXES = ("x-ratelimit-", "openai-")
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


def sse_headers(call: Call) -> dict[str, str]:
    """Headers of a committed stream."""
    headers = dict(_SSE_HEADERS)
    headers.update(gateway_headers(call))
    return headers


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
