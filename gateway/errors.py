"""Outcome classes: every upstream result is classified here, once.

The table in DESIGN.md section 3 is :data:`POLICY`; :func:`classify_response`,
:func:`classify_error_body` and :func:`classify_exception` map what an upstream did onto
it. :class:`GatewayError` is what the gateway itself answers, in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import math
import re
import ssl
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from breakers.probes import connect_failure


class Outcome(StrEnum):
    """What happened on one attempt."""

    OK = "ok"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXHAUSTED = "quota_exhausted"
    SERVER_ERROR = "server_error"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    AUTH_FAILED = "auth_failed"
    MODEL_MISSING = "model_missing"
    CONTEXT_TOO_LONG = "context_too_long"
    CONTENT_REFUSED = "content_refused"
    CLIENT_ERROR = "client_error"
    # Not in the upstream's words but ours: a 2xx whose body or stream is not a valid
    # OpenAI answer (malformed SSE, a stream that ends before its first token).
    BAD_RESPONSE = "bad_response"
    CANCELLED = "cancelled"
    # The request's own deadline (x-gateway-timeout, or the gateway's request_timeout)
    # ran out: a 504 for the client, and not the provider's failure.
    DEADLINE = "deadline"
    # A pooled connection the server had closed: resent once, not the provider's failure.
    STALE_CONNECTION = "stale_connection"
    # The attempt spent its share of the request's time while another provider was left
    # to try: fail over, but the provider did not break its own timeout.
    BUDGET = "budget_spent"
    # Skips: no request was sent.
    BREAKER_OPEN = "breaker_open"
    PROVIDER_FULL = "provider_full"
    # The provider's rate budget (rpm/tpm, configured or learned from its headers) had
    # nothing left for this request within max_queue_wait (gateway.budgets).
    OUT_OF_BUDGET = "out_of_budget"
    UNSUPPORTED = "unsupported"


class BreakerEffect(Enum):
    """How an outcome counts for the provider's circuit breaker."""

    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"


@dataclass(frozen=True, slots=True)
class Policy:
    """What the failover loop does after an outcome."""

    retry_same: bool
    fail_over: bool
    breaker: BreakerEffect


_F, _S, _N = BreakerEffect.FAILURE, BreakerEffect.SUCCESS, BreakerEffect.NEUTRAL
POLICY: dict[Outcome, Policy] = {
    Outcome.OK: Policy(False, False, _S),
    Outcome.RATE_LIMITED: Policy(True, True, _F),
    Outcome.QUOTA_EXHAUSTED: Policy(False, True, _F),
    Outcome.SERVER_ERROR: Policy(True, True, _F),
    Outcome.UNREACHABLE: Policy(False, True, _F),
    Outcome.TIMEOUT: Policy(False, True, _F),
    Outcome.AUTH_FAILED: Policy(False, True, _F),
    Outcome.MODEL_MISSING: Policy(False, True, _N),
    Outcome.CONTEXT_TOO_LONG: Policy(False, True, _N),
    Outcome.CONTENT_REFUSED: Policy(False, False, _N),
    Outcome.CLIENT_ERROR: Policy(False, False, _S),
    Outcome.BAD_RESPONSE: Policy(False, True, _F),
    Outcome.CANCELLED: Policy(False, False, _N),
    Outcome.DEADLINE: Policy(False, False, _N),
    Outcome.STALE_CONNECTION: Policy(False, False, _N),
    Outcome.BUDGET: Policy(False, True, _N),
    Outcome.BREAKER_OPEN: Policy(False, True, _N),
    Outcome.PROVIDER_FULL: Policy(False, True, _N),
    Outcome.OUT_OF_BUDGET: Policy(False, True, _N),
    Outcome.UNSUPPORTED: Policy(False, True, _N),
}

#: Words for log lines: "OpenAI rate limit exceeded, failing over to LM Studio".
PHRASES = {
    Outcome.RATE_LIMITED: "rate limit exceeded",
    Outcome.QUOTA_EXHAUSTED: "quota exhausted",
    Outcome.SERVER_ERROR: "server error",
    Outcome.UNREACHABLE: "unreachable",
    Outcome.TIMEOUT: "timed out",
    Outcome.AUTH_FAILED: "rejected the gateway's API key",
    Outcome.MODEL_MISSING: "does not serve the model",
    Outcome.CONTEXT_TOO_LONG: "context length exceeded",
    Outcome.BAD_RESPONSE: "sent an invalid response",
    Outcome.DEADLINE: "ran out of the request's time",
    Outcome.BUDGET: "took its share of the request's time",
    Outcome.BREAKER_OPEN: "circuit breaker open",
    Outcome.PROVIDER_FULL: "at its concurrency limit",
    Outcome.OUT_OF_BUDGET: "out of its rate budget",
    Outcome.UNSUPPORTED: "does not support this endpoint",
}

_SERVER_STATUSES = frozenset({500, 502, 503, 504, 529})


@dataclass(frozen=True, slots=True)
class Classified:
    """An outcome with the upstream's own words and its retry hint."""

    outcome: Outcome
    detail: str
    status: int | None = None
    retry_after: float | None = None


def _error_fields(body: Any) -> tuple[str, str, str]:
    """(code, type, message) from an OpenAI error body, lower-cased; '' when absent."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, str):  # some servers send {"error": "message"}
        return "", "", err.lower()
    if not isinstance(err, dict):
        return "", "", _bare_message(body).lower()
    return (
        str(err.get("code") or "").lower(),
        str(err.get("type") or "").lower(),
        str(err.get("message") or "").lower(),
    )


def _bare_message(body: Any) -> str:
    """The message of an error body without an ``error`` object: ``{"message": ...}``, or
    FastAPI's ``{"detail": "Not Found"}`` (llama.cpp's Python server, vLLM)."""
    if not isinstance(body, dict):
        return ""
    msg = body.get("message")
    if msg:
        return str(msg)
    detail = body.get("detail")
    return detail if isinstance(detail, str) else ""


def error_message(body: Any) -> str:
    """The upstream's error message (original case), for details; '' when absent."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err.get("code") or "")[:300]
    if isinstance(err, str):
        return err[:300]
    return _bare_message(body)[:300]


def _detail(status: int, message: str) -> str:
    """``404: Not Found``: the status once, also when the upstream's own text starts with
    it (aiohttp's ``404: Not Found``, Go's ``404 page not found``)."""
    if status == 200:  # an error event inside a stream: the status says nothing
        return message
    if not message:
        return str(status)
    return message if message.startswith(str(status)) else f"{status}: {message}"


def classify_error_body(status: int, body: Any, retry_after: float | None = None) -> Classified:
    """Classify an upstream error from its status and (parsed) OpenAI error body.

    Also used for ``{"error": ...}`` events inside a 200 stream, with ``status`` 200.
    """
    code, etype, message = _error_fields(body)
    words = f"{code} {etype} {message}"
    detail = _detail(status, error_message(body))
    if code == "rate_limit_exceeded":
        return Classified(Outcome.RATE_LIMITED, detail, status, retry_after)
    if "quota" in words or "billing" in words or status == 402:
        return Classified(Outcome.QUOTA_EXHAUSTED, detail, status)
    if status == 429 or "rate_limit" in words or "rate limit" in words:
        return Classified(Outcome.RATE_LIMITED, detail, status, retry_after)
    if status in (401, 403) or code in ("invalid_api_key", "invalid_authentication"):
        return Classified(Outcome.AUTH_FAILED, detail, status)
    if "context_length_exceeded" in words or "maximum context length" in words:
        return Classified(Outcome.CONTEXT_TOO_LONG, detail, status)
    if "content_policy_violation" in words or "content_filter" in code:
        return Classified(Outcome.CONTENT_REFUSED, detail, status)
    if (
        code == "model_not_found"
        or (status == 404 and "model" in words)
        or (
            "model" in message
            and any(w in message for w in ("not found", "does not exist", "not loaded"))
        )
    ):
        return Classified(Outcome.MODEL_MISSING, detail, status)
    if status == 404:
        # No such path upstream (aiohttp's "404: Not Found", OpenAI's "Invalid URL"): the
        # provider lacks this endpoint, whatever the model.
        return Classified(Outcome.UNSUPPORTED, detail, status)
    if status in _SERVER_STATUSES or status >= 500:
        return Classified(Outcome.SERVER_ERROR, detail, status, retry_after)
    if status == 200:  # an error event in a stream without a recognisable code
        return Classified(Outcome.SERVER_ERROR, detail, status)
    return Classified(Outcome.CLIENT_ERROR, detail, status)


#: The longest wait an upstream hint (``Retry-After``, ``retry-after-ms``,
#: ``x-ratelimit-reset-*``) may ask for where the provider is not known: the default
#: ``quota_reset_timeout``. Where the provider is known, pass its own as ``cap``.
MAX_RETRY_AFTER = 300.0


def clamp_seconds(value: float | None, cap: float = MAX_RETRY_AFTER) -> float | None:
    """``value`` clamped to ``[0, cap]``; None for None and NaN.

    Numbers from upstreams are untrusted: ``inf`` or ``1e12`` would overflow a datetime, a
    ``math.ceil`` or a header further on, and a negative wait means nothing.
    """
    if value is None or math.isnan(value):
        return None
    return min(max(value, 0.0), cap)


def parse_retry_after(headers: Any, cap: float = MAX_RETRY_AFTER) -> float | None:
    """Seconds to wait from ``Retry-After``, ``retry-after-ms`` or ``x-ratelimit-reset-*``,
    clamped to ``[0, cap]``; a header that is not a number is skipped."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            hint = clamp_seconds(float(ms) / 1000, cap)
        except ValueError:
            hint = None
        if hint is not None:
            return hint
    ra = headers.get("Retry-After")
    if ra:
        try:
            hint = clamp_seconds(float(ra), cap)
        except ValueError:
            hint = None  # an HTTP date: rare from LLM APIs, treated as no hint
        if hint is not None:
            return hint
    # OpenAI's reset time counts only when the request budget is what ran out.
    reset = headers.get("x-ratelimit-reset-requests")
    if reset and headers.get("x-ratelimit-remaining-requests") == "0":
        return clamp_seconds(parse_duration(reset), cap)
    return None


def parse_duration(text: str) -> float | None:
    """OpenAI's reset durations: '1s', '6m0s', '20ms', '1h2m3.5s' (a bare number is seconds);
    None when ``text`` is not one."""
    total, num = 0.0, ""
    i = 0
    try:
        while i < len(text):
            c = text[i]
            if c.isdigit() or c == ".":
                num += c
            elif text.startswith("ms", i):
                total += float(num) / 1000
                num, i = "", i + 1
            else:
                total += float(num) * {"h": 3600, "m": 60, "s": 1}[c]
                num = ""
            i += 1
        return total + float(num) if num else total
    except (KeyError, ValueError):
        return None


#: Upstream usage counts are untrusted: no context window comes near a billion tokens.
MAX_TOKENS = 10**9


def token_count(value: Any) -> int | None:
    """A usage count fit for metrics, budgets and the log, or None: a negative count would
    make a counter raise (and the answer a 500), a string could forge a log line."""
    if type(value) is int and 0 <= value <= MAX_TOKENS:  # not bool, not float
        return value
    return None


def classify_response(
    status: int, body: bytes, headers: Any, retry_cap: float = MAX_RETRY_AFTER
) -> Classified:
    """Classify a non-2xx upstream response from its status, headers and raw body.

    ``retry_cap`` bounds the upstream's retry hint (the provider's ``quota_reset_timeout``).
    """
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = {"error": {"message": body[:200].decode("utf-8", "replace")}}
    return classify_error_body(status, parsed, parse_retry_after(headers, retry_cap))


def classify_exception(exc: BaseException) -> Classified:
    """Classify a transport failure (no usable response)."""
    if isinstance(exc, asyncio.CancelledError):
        return Classified(Outcome.CANCELLED, "client went away")
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return Classified(Outcome.TIMEOUT, str(exc) or "timed out")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | ssl.SSLError):
        return Classified(Outcome.UNREACHABLE, f"TLS error: {exc}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Classified(Outcome.UNREACHABLE, connect_failure(exc))
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return Classified(Outcome.UNREACHABLE, "server disconnected")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return Classified(Outcome.UNREACHABLE, "connection dropped mid-response")
    if isinstance(exc, aiohttp.ClientResponseError):
        return Classified(Outcome.BAD_RESPONSE, f"invalid HTTP response: {exc.message}")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return Classified(Outcome.UNREACHABLE, f"{type(exc).__name__}: {exc}")
    raise exc


def error_body(
    message: str,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> bytes:
    """An OpenAI-style error body, encoded."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


class GatewayError(Exception):
    """An error the gateway answers itself (bad input, no provider left), OpenAI-style."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.headers = headers  # e.g. a client's own x-ratelimit-* budget

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        """The error as a response; ``Retry-After`` and the error's own headers are added."""
        headers = dict(headers or {})
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        if self.headers:
            headers.update(self.headers)
        return web.Response(
            body=error_body(self.message, self.type, self.code, self.param),
            status=self.status,
            content_type="application/json",
            headers=headers,
        )


# Words of an error about the request rather than the server: an unsupported parameter, a
# schema the server cannot use, an endpoint the model does not serve.
_REQUEST_WORDS = re.compile(
    r"unsupported|not supported|does not support|invalid|must be|must have|is required"
    r"|required (?:field|param)|missing (?:field|param|required)|unknown (?:field|param|arg)"
    r"|unrecognized|schema|not implemented|not allowed|expected (?:a|an|one of)"
)
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`")
_NUMBER = re.compile(r"\d+")


def request_fault(cls: Classified) -> bool:
    """True for a server error that reads as the request's fault, not the server's.

    llama.cpp answers 500 (or 501) to a parameter it does not support. Such an error is not
    retried on the same provider: the same request gets the same answer.
    """
    return (
        cls.outcome is Outcome.SERVER_ERROR
        and cls.status in (500, 501)
        and _REQUEST_WORDS.search(cls.detail.lower()) is not None
    )


def error_shape(cls: Classified) -> str:
    """What an error says with its particulars (quoted values, numbers) blanked out, so
    that two servers refusing the same request compare equal."""
    text = _NUMBER.sub("#", _QUOTED.sub("?", cls.detail.lower()))
    return f"{cls.status}:{' '.join(text.split())[:200]}"
