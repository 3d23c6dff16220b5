"""Outcome classification: one row of DESIGN.md's table per test, with real bodies."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

from gateway.errors import (
    MAX_RETRY_AFTER,
    POLICY,
    BreakerEffect,
    Outcome,
    classify_error_body,
    classify_exception,
    classify_response,
    parse_retry_after,
)
from tests import fake_upstream as fu


def classify(behaviour: fu.Behaviour) -> tuple[Outcome, float | None]:
    c = classify_response(
        behaviour.status, orjson.dumps(behaviour.body), CIMultiDict(behaviour.headers)
    )
    return c.outcome, c.retry_after


def test_rate_limit_with_retry_after():
    assert classify(fu.rate_limited(retry_after=7)) == (Outcome.RATE_LIMITED, 7.0)


def test_rate_limit_by_message_only():
    body = {"error": {"message": "rate_limit hit for tokens per min", "type": None, "code": None}}
    assert classify_error_body(429, body).outcome is Outcome.RATE_LIMITED
    # an error event inside a 200 stream, named only by its message
    assert classify_error_body(200, body).outcome is Outcome.RATE_LIMITED


def test_insufficient_quota_is_not_a_rate_limit():
    assert classify(fu.insufficient_quota())[0] is Outcome.QUOTA_EXHAUSTED
    billing = {
        "error": {
            "message": "Billing hard limit has been reached",
            "code": "billing_hard_limit_reached",
        }
    }
    assert classify_error_body(400, billing).outcome is Outcome.QUOTA_EXHAUSTED


@pytest.mark.parametrize("status", [500, 502, 503, 504, 529])
def test_server_errors(status):
    assert classify(fu.server_error(status))[0] is Outcome.SERVER_ERROR


def test_server_error_with_html_body():
    c = classify_response(502, b"<html><body>Bad Gateway</body></html>", CIMultiDict())
    assert c.outcome is Outcome.SERVER_ERROR
    assert "Bad Gateway" in c.detail


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failed(status):
    b = fu.openai_error(
        status, "Incorrect API key provided: sk-abc***.", "invalid_request_error", "invalid_api_key"
    )
    assert classify(b)[0] is Outcome.AUTH_FAILED


def test_model_missing():
    b = fu.openai_error(
        404,
        "The model `gpt-9` does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    )
    assert classify(b)[0] is Outcome.MODEL_MISSING
    # Ollama's words for it
    ollama = {
        "error": {
            "message": 'model "llama3.2" not found, try pulling it first',
            "type": "api_error",
        }
    }
    assert classify_error_body(404, ollama).outcome is Outcome.MODEL_MISSING
    # LM Studio's
    lms = {"error": "Model with key 'local-model' not loaded."}
    assert classify_error_body(400, lms).outcome is Outcome.MODEL_MISSING


def test_context_too_long():
    assert classify(fu.context_too_long())[0] is Outcome.CONTEXT_TOO_LONG


def test_content_refused():
    assert classify(fu.content_refused())[0] is Outcome.CONTENT_REFUSED


@pytest.mark.parametrize("status", [400, 413, 422])
def test_client_error(status):
    b = fu.openai_error(status, "Invalid type for 'temperature'.", "invalid_request_error", None)
    assert classify(b)[0] is Outcome.CLIENT_ERROR


async def test_connection_refused_is_unreachable(unused_tcp_port_factory):
    port = unused_tcp_port_factory()
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientError) as info:
            await s.get(f"http://127.0.0.1:{port}/")
    c = classify_exception(info.value)
    assert c.outcome is Outcome.UNREACHABLE
    assert "connect" in c.detail


def test_transport_failures():
    assert classify_exception(aiohttp.ServerDisconnectedError()).outcome is Outcome.UNREACHABLE
    assert classify_exception(aiohttp.ClientPayloadError("cut")).outcome is Outcome.UNREACHABLE
    assert classify_exception(TimeoutError()).outcome is Outcome.TIMEOUT
    assert classify_exception(asyncio.CancelledError()).outcome is Outcome.CANCELLED


def test_policy_matches_the_design_table():
    def row(o):
        p = POLICY[o]
        return (p.retry_same, p.fail_over, p.breaker)

    F, S, N = BreakerEffect.FAILURE, BreakerEffect.SUCCESS, BreakerEffect.NEUTRAL
    assert row(Outcome.RATE_LIMITED) == (True, True, F)
    assert row(Outcome.QUOTA_EXHAUSTED) == (False, True, F)
    assert row(Outcome.SERVER_ERROR) == (True, True, F)
    assert row(Outcome.UNREACHABLE) == (False, True, F)
    assert row(Outcome.TIMEOUT) == (False, True, F)
    assert row(Outcome.AUTH_FAILED) == (False, True, F)
    assert row(Outcome.MODEL_MISSING) == (False, True, N)
    assert row(Outcome.CONTEXT_TOO_LONG) == (False, True, N)
    assert row(Outcome.CONTENT_REFUSED) == (False, False, N)
    assert row(Outcome.CLIENT_ERROR) == (False, False, S)
    assert row(Outcome.CANCELLED) == (False, False, N)


def test_retry_after_forms():
    assert parse_retry_after(CIMultiDict({"Retry-After": "3"})) == 3.0
    assert parse_retry_after(CIMultiDict({"retry-after-ms": "250"})) == 0.25
    spent = {"x-ratelimit-remaining-requests": "0"}
    assert parse_retry_after(CIMultiDict({"x-ratelimit-reset-requests": "1m30s", **spent})) == 90.0
    assert parse_retry_after(
        CIMultiDict({"x-ratelimit-reset-requests": "20ms", **spent})
    ) == pytest.approx(0.02)
    # with requests left, the token budget ran out: the request reset time says nothing
    left = {"x-ratelimit-reset-requests": "6m0s", "x-ratelimit-remaining-requests": "4"}
    assert parse_retry_after(CIMultiDict(left)) is None
    assert parse_retry_after(CIMultiDict({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) is None
    assert parse_retry_after(CIMultiDict()) is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "inf"}, 60.0),
        ({"Retry-After": "Infinity"}, 60.0),
        ({"Retry-After": "1e12"}, 60.0),
        ({"Retry-After": "1e400"}, 60.0),  # float() says inf
        ({"Retry-After": "-5"}, 0.0),
        ({"Retry-After": "nan"}, None),
        ({"retry-after-ms": "inf"}, 60.0),
        ({"retry-after-ms": "-1"}, 0.0),
        ({"retry-after-ms": "nan", "Retry-After": "7"}, 7.0),  # a useless hint is skipped
        ({"x-ratelimit-reset-requests": "99999999999h", "x-ratelimit-remaining-requests": "0"}, 60),
    ],
)
def test_absurd_retry_after_is_clamped(headers, expected):
    """Numbers from upstreams are untrusted: they end in [0, cap] or are ignored."""
    assert parse_retry_after(CIMultiDict(headers), cap=60.0) == expected
    cls = classify_response(429, b"", CIMultiDict(headers), retry_cap=60.0)
    assert cls.retry_after == expected


def test_retry_after_has_a_default_cap():
    """Callers that do not know the provider still get a finite, bounded number."""
    hint = parse_retry_after(CIMultiDict({"Retry-After": "inf"}))
    assert hint == MAX_RETRY_AFTER
    assert classify_response(429, b"", CIMultiDict({"Retry-After": "1e300"})).retry_after == (
        MAX_RETRY_AFTER
    )
