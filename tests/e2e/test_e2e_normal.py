"""A real model behind each provider: normal answers, and a wrong upstream model name."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.conftest import FALLBACK_ALIAS, PRIMARY_ALIAS, chat_answer, chat_stream

pytestmark = pytest.mark.real_upstream


async def test_primary_answers_non_stream(primary, fallback, real_gateway):
    gw = await real_gateway(primary, fallback)
    async with gw.sdk() as sdk:
        headers, text, finish, completion = await chat_answer(sdk)
    assert text.strip()
    assert finish in ("stop", "length")
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert headers["x-gateway-provider"] == "lmstudio"
    assert headers["x-gateway-attempts"] == "1"
    assert headers["x-gateway-failover"] == "false"
    assert headers["x-request-id"]


async def test_primary_answers_stream(primary, fallback, real_gateway):
    gw = await real_gateway(primary, fallback)
    async with gw.sdk() as sdk:
        headers, text, finish = await chat_stream(sdk)
    assert text.strip()
    assert finish in ("stop", "length")
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["x-gateway-provider"] == "lmstudio"
    assert headers["x-gateway-attempts"] == "1"
    assert headers["x-gateway-failover"] == "false"


async def test_wrong_upstream_model_is_skipped_not_failed(primary, fallback, real_gateway):
    """The probe lists the server's alias; a configured name it lacks is model_missing."""
    gw = await real_gateway(primary, fallback, models={"lmstudio": "gemma-not-loaded"})
    missing = await gw.attempts("lmstudio", "model_missing")
    async with gw.sdk() as sdk:
        answers = [await chat_answer(sdk), await chat_stream(sdk)]
    for headers, text, finish, *_ in answers:
        assert text.strip()
        assert finish in ("stop", "length")
        assert headers["x-gateway-provider"] == "ollama"
        assert headers["x-gateway-attempts"] == "2"  # the skip is an attempt record
        assert headers["x-gateway-failover"] == "true"
    assert await gw.attempts("lmstudio", "model_missing") == missing + 2
    report = await gw.providers()
    assert report["lmstudio"]["loaded_models"] == [PRIMARY_ALIAS]
    assert report["lmstudio"]["state"] == "closed"  # not a failure of the provider
    assert report["lmstudio"]["consecutive_failures"] == 0


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
async def test_model_missing_everywhere_lists_every_attempt(
    primary, fallback, real_gateway, stream
):
    gw = await real_gateway(
        primary, fallback, models={"lmstudio": "gemma-nope-1", "ollama": "gemma-nope-2"}
    )
    async with gw.sdk() as sdk:
        with pytest.raises(openai.APIStatusError) as info:
            if stream:
                await chat_stream(sdk)
            else:
                await chat_answer(sdk)
    err = info.value
    # No request was sent anywhere: the gateway answers itself (404 model_not_found).
    assert err.status_code in (404, 503)
    assert err.response.headers["x-gateway-provider"] == "none"
    assert err.response.headers["x-gateway-attempts"] == "2"
    message = err.message
    assert "LM Studio: model_missing (model 'gemma-nope-1' is not loaded)" in message
    assert "Ollama: model_missing (model 'gemma-nope-2' is not loaded)" in message
    report = await gw.providers()
    assert report["ollama"]["loaded_models"] == [FALLBACK_ALIAS]
    for name in ("lmstudio", "ollama"):
        assert report[name]["state"] == "closed"
        assert report[name]["consecutive_failures"] == 0
