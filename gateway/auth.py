"""Access control: gateway API keys for clients, an admin key or loopback for operators.

Keys are kept only as SHA-256 digests, so neither configuration dumps nor memory
inspection show them, and a presented key is compared by its digest. No key, valid or
not, is ever logged or echoed.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from gateway import metrics
from gateway.errors import GatewayError

# Liveness and readiness stay open: orchestrators probe them without credentials.
_OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# /admin/* shows every provider's URL, state and load: loopback only unless an admin key
# is set. /metrics is not: Prometheus scrapes from another host or container, and it
# shows counts, not configuration.
_ADMIN_PREFIX = "/admin/"
_METRICS_PREFIX = "/metrics"
#: The digest of the client key a request presented (never the key): the cache's partition.
CLIENT_KEY = web.RequestKey("client_key_digest", str)


def digest(key: str) -> str:
    """The SHA-256 hex digest under which a key is stored."""
    # aiohttp decodes header bytes with surrogateescape: encode them back the same way.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Who may call what. Empty ``client_keys``: the API is open.

    ``/admin/*`` is served to loopback peers only unless ``admin_key`` is set;
    ``admin_loopback_only`` keeps ``/admin/*`` and ``/metrics`` on loopback even then.
    """

    client_keys: frozenset[str] = frozenset()  # digests
    admin_key: str | None = None  # digest
    admin_loopback_only: bool = False


def exposure_warning(host: str, port: int, policy: AccessPolicy) -> str | None:
    """The start-up warning for a gateway that other hosts can reach with no client keys,
    or None (bound to loopback, or keys required)."""
    if policy.client_keys or _is_loopback_host(host):
        return None
    where = host or "every interface"
    return (
        f"listening on {where} port {port} without GATEWAY_API_KEYS: anyone who can reach "
        "this port can use the gateway and spend the providers' keys "
        "(set GATEWAY_API_KEYS, or --host 127.0.0.1)"
    )


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "" (every interface) or a name, which may resolve anywhere


def _bearer(request: web.Request) -> str | None:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _is_loopback(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        return False


def _denied(status: int, message: str, code: str) -> web.Response:
    metrics.REQUESTS.labels("other", "none", str(status), "false").inc()
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return GatewayError(status, message, code=code).response(headers)


def auth_middleware(policy: AccessPolicy) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A middleware enforcing ``policy``; the request never reaches a handler if denied."""

    @web.middleware
    async def check(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        path = request.path
        if path in _OPEN_PATHS:
            return await handler(request)
        admin = path.startswith(_ADMIN_PREFIX)
        if admin or path.startswith(_METRICS_PREFIX):
            keyless_admin = admin and policy.admin_key is None
            if (policy.admin_loopback_only or keyless_admin) and not _is_loopback(request):
                hint = "" if policy.admin_loopback_only else " without GATEWAY_ADMIN_KEY"
                return _denied(403, f"This endpoint is served on loopback only{hint}.", "forbidden")
            wanted = {policy.admin_key} if policy.admin_key else policy.client_keys
        else:
            wanted = policy.client_keys
        if wanted:
            token = _bearer(request)
            if token is None or (presented := digest(token)) not in wanted:
                if token is None:
                    message = "You didn't provide an API key. Use 'Authorization: Bearer KEY'."
                else:
                    message = "Incorrect API key provided."
                return _denied(401, message, "invalid_api_key")
            request[CLIENT_KEY] = presented
        return await handler(request)

    return check
