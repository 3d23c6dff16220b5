"""Access control: gateway API keys for clients, an admin key or loopback for operators.

Keys are kept only as SHA-256 digests, so neither configuration dumps nor memory
inspection show them, and a presented key is compared by its digest. No key, valid or
not, is ever logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

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
# The status page is guarded like /admin/*. Its HTML holds no data (it is the form that
# asks for the key), and a browser's EventSource cannot send a header, so a GET there
# may also present the session cookie that POST /status/session gives for the key.
_STATUS_PAGE = "/status"
_STATUS_PATHS = frozenset({_STATUS_PAGE, "/status.json", "/status/events", "/status/session"})
SESSION_COOKIE = "gateway_status"

#: The digest of the client key a request came with (never the key), set when client keys
#: are required: its quota (gateway.quotas) and its partition of the cache.
CLIENT_KEY = web.RequestKey("client_key", str)


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


@dataclass(frozen=True, slots=True)
class Sessions:
    """Status page sessions: ``EXPIRY.MAC`` cookies signed with a secret of this process
    (a restart or a new key signs everyone out), valid for ``ttl`` seconds. The key
    itself never leaves the request that presents it."""

    ttl: int = 12 * 3600
    secret: bytes = field(default_factory=lambda: os.urandom(32), repr=False)

    def _mac(self, expiry: str) -> str:
        return hmac.new(self.secret, expiry.encode(), hashlib.sha256).hexdigest()

    def issue(self) -> tuple[str, int]:
        """A new session's cookie value and its lifetime in seconds."""
        expiry = str(int(time.time()) + self.ttl)
        return f"{expiry}.{self._mac(expiry)}", self.ttl

    def valid(self, value: str | None) -> bool:
        """True for an unexpired cookie value that this process issued."""
        expiry, _, mac = (value or "").partition(".")
        if not expiry.isdigit() or not hmac.compare_digest(mac, self._mac(expiry)):
            return False
        return int(expiry) > time.time()


SESSIONS = web.AppKey("status_sessions", Sessions)


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


def auth_middleware(
    policy: AccessPolicy, sessions: Sessions | None = None
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A middleware enforcing ``policy``; the request never reaches a handler if denied.

    ``sessions`` checks the status page's cookie (by default, a set of its own)."""
    sessions = sessions if sessions is not None else Sessions()

    @web.middleware
    async def check(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        path = request.path
        if path in _OPEN_PATHS:
            return await handler(request)
        status = path in _STATUS_PATHS
        admin = status or path.startswith(_ADMIN_PREFIX)
        if admin or path.startswith(_METRICS_PREFIX):
            keyless_admin = admin and policy.admin_key is None
            if (policy.admin_loopback_only or keyless_admin) and not _is_loopback(request):
                hint = "" if policy.admin_loopback_only else " without GATEWAY_ADMIN_KEY"
                return _denied(403, f"This endpoint is served on loopback only{hint}.", "forbidden")
            wanted = {policy.admin_key} if policy.admin_key else policy.client_keys
        else:
            wanted = policy.client_keys
        if wanted and status and request.method == "GET":
            if path == _STATUS_PAGE or sessions.valid(request.cookies.get(SESSION_COOKIE)):
                return await handler(request)
        if wanted:
            token = _bearer(request)
            key = digest(token) if token is not None else None
            if key is None or key not in wanted:
                if token is None:
                    message = "You didn't provide an API key. Use 'Authorization: Bearer KEY'."
                else:
                    message = "Incorrect API key provided."
                return _denied(401, message, "invalid_api_key")
            request[CLIENT_KEY] = key
        return await handler(request)

    return check
