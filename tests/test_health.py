"""Breakers fed by probes, through the gateway: skip dead providers without touching them."""

from __future__ import annotations

import asyncio

import orjson

from breakers import State
from gateway.server import PROVIDERS
from tests import fake_upstream as fu
from tests.conftest import chat
from tests.fake_upstream import wait_until


def providers(client):
    return client.app[PROVIDERS]


async def post(client, body=None):
    resp = await client.post("/v1/chat/completions", json=body or chat())
    return resp, await resp.read()


async def test_dead_provider_is_skipped_without_a_connection(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    client = await gateway(a, b, probes=True, probe_interval=0.05, fail_max=5, reset_timeout=60)
    openai = providers(client)["openai"]
    await wait_until(lambda: openai.loaded_models is not None)
    await a.stop()  # the provider dies: its port now refuses
    await wait_until(lambda: openai.breaker.state is State.OPEN)
    assert openai.breaker.fail_counter == 1  # one refused probe was enough
    await openai.prober.stop()  # hold the picture still while we count
    await a.start(port=a.port)  # listening again, counting connections, breaker still open
    a.connections = 0
    for _ in range(20):
        resp, _ = await post(client)
        assert resp.headers["x-gateway-provider"] == "lmstudio"
        assert resp.headers["x-gateway-attempts"] == "2"
    assert a.connections == 0 and a.requests == []
    report = await (await client.get("/admin/providers")).json()
    entry = report["providers"][0]
    assert entry["state"] == "open" and entry["consecutive_failures"] == 1
    assert entry["last_probe"]["error"]


async def test_recovery_sends_exactly_one_trial(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.server_error(503)
    client = await gateway(a, b, probes=False, fail_max=2, reset_timeout=60, max_retries=0)
    openai = providers(client)["openai"]
    for _ in range(2):
        await post(client)
    assert openai.breaker.state is State.OPEN
    a.requests.clear()
    a.default = fu.ok(delay=0.3)  # recovered, and slow enough that all 20 overlap
    await openai.prober.probe_once()  # a good probe: half-open, the next request is the trial
    assert openai.breaker.state is State.HALF_OPEN
    results = await asyncio.gather(*(post(client) for _ in range(20)))
    by = [r.headers["x-gateway-provider"] for r, _ in results]
    assert by.count("openai") == 1 and by.count("lmstudio") == 19
    assert len(a.requests) == 1
    assert openai.breaker.state is State.CLOSED
    resp, _ = await post(client)
    assert resp.headers["x-gateway-provider"] == "openai"


async def test_breaker_reopens_and_half_opens_by_time(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.server_error(500)
    client = await gateway(a, b, fail_max=1, reset_timeout=0.2, max_retries=0)
    openai = providers(client)["openai"]
    await post(client)
    assert openai.breaker.state is State.OPEN
    await wait_until(lambda: openai.breaker.state is State.HALF_OPEN)
    a.default = fu.ok()
    resp, _ = await post(client)
    assert resp.headers["x-gateway-provider"] == "openai"
    assert openai.breaker.state is State.CLOSED


async def test_quota_keeps_the_breaker_open_longer(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.insufficient_quota()
    client = await gateway(a, b, fail_max=5, reset_timeout=1, quota_reset_timeout=600)
    openai = providers(client)["openai"]
    await post(client)
    assert openai.breaker.state is State.OPEN
    assert 590 < openai.breaker.retry_in() <= 600
    resp, _ = await post(client)
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert len(a.requests) == 1


async def test_retry_after_opens_for_that_long(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.rate_limited(retry_after=3)
    client = await gateway(a, b, fail_max=5, reset_timeout=60)
    openai = providers(client)["openai"]
    await post(client)
    assert openai.breaker.state is State.OPEN
    assert 2.5 < openai.breaker.retry_in() <= 3.0
    entry = (await (await client.get("/admin/providers")).json())["providers"][0]
    from datetime import datetime

    span = datetime.fromisoformat(entry["reopens_at"]) - datetime.fromisoformat(entry["opened_at"])
    assert 2.9 < span.total_seconds() < 3.1


async def test_model_missing_skips_without_opening(gateway, upstreams, refused_url):
    b = await upstreams("b", models=("some-other-model",))
    c = await upstreams("c", models=("llama3.2:latest",))
    client = await gateway(refused_url, b, c, probes=True, probe_interval=0.05, fail_max=1)
    lms = providers(client)["lmstudio"]
    await wait_until(
        lambda: (
            lms.loaded_models is not None and providers(client)["ollama"].loaded_models is not None
        )
    )
    resp, _ = await post(client)
    assert resp.headers["x-gateway-provider"] == "ollama"  # "llama3.2" is "llama3.2:latest"
    assert resp.headers["x-gateway-attempts"] == "3"
    assert b.requests == []
    assert lms.breaker.state is State.CLOSED


async def test_model_missing_everywhere_is_404(gateway, upstreams):
    b = await upstreams("b", models=("some-other-model",))
    client = await gateway(
        b, probes=True, probe_interval=0.05, per={"openai": {"model": "local-model"}}
    )
    await wait_until(lambda: providers(client)["openai"].loaded_models is not None)
    resp, body = await post(client)
    assert resp.status == 404
    assert orjson.loads(body)["error"]["code"] == "model_not_found"


async def test_all_open_answers_at_once_with_retry_after(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = b.default = fu.server_error(500)
    client = await gateway(a, b, fail_max=1, reset_timeout=30, max_retries=0)
    await post(client)
    sent = len(a.requests) + len(b.requests)
    resp, body = await post(client)
    assert resp.status == 503
    assert len(a.requests) + len(b.requests) == sent  # nothing went upstream
    assert 30 <= int(resp.headers["Retry-After"]) <= 36  # jittered by up to +20 %
    msg = orjson.loads(body)["error"]["message"]
    assert "OpenAI: breaker_open" in msg and "LM Studio: breaker_open" in msg
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert set((await ready.json())["providers"]) == {"openai", "lmstudio"}


async def test_readyz_ok_while_one_provider_usable(gateway, upstreams, refused_url):
    a = await upstreams("a")
    client = await gateway(
        refused_url, a, probes=True, probe_interval=0.05, fail_max=1, reset_timeout=60
    )
    ps = providers(client)
    await wait_until(lambda: ps["openai"].breaker.state is State.OPEN)
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["provider"] == "lmstudio"  # the first usable one
    await a.stop()
    await wait_until(lambda: ps["lmstudio"].breaker.state is State.OPEN)
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert set((await resp.json())["providers"]) == {"openai", "lmstudio"}
    await a.start(port=a.port)
    await wait_until(lambda: ps["lmstudio"].usable())
    resp = await client.get("/readyz")
    assert resp.status == 200


async def test_models_lists_only_healthy_providers(gateway, upstreams):
    a = await upstreams("a", models=("gpt-4o",))
    b = await upstreams("b", models=("local-model",))
    client = await gateway(a, b, probes=True, probe_interval=0.05, fail_max=1, reset_timeout=60)
    ps = providers(client)
    await wait_until(lambda: all(p.loaded_models is not None for p in ps.values()))
    b.models_status = 503
    await wait_until(lambda: ps["lmstudio"].breaker.state is State.OPEN)
    ids = {m["id"] for m in (await (await client.get("/v1/models")).json())["data"]}
    assert ids == {"gpt-4o"}


async def test_probes_stop_on_shutdown(aiohttp_server, upstreams):
    from gateway.config import Settings
    from gateway.server import create_app
    from tests.conftest import provider_configs

    a = await upstreams("a")
    app = create_app(Settings(providers=provider_configs(a, probe_interval=0.02)))
    server = await aiohttp_server(app)
    await wait_until(lambda: a.probes >= 3)
    await server.close()
    after = a.probes
    await asyncio.sleep(0.2)
    assert a.probes == after


async def test_slow_probe_while_busy_is_not_a_failure(gateway, upstreams):
    """A single-slot server answers /models only between generations (llama.cpp)."""
    a = await upstreams("a")
    a.default = fu.stream(tokens=50, chunk_delay=0.02)
    client = await gateway(a, fail_max=1, probe_timeout=0.05)
    openai = providers(client)["openai"]
    a.models_delay = 0.3
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    result = await openai.prober.probe_once()  # times out while our stream runs there
    await resp.read()
    assert result.error and result.inconclusive
    assert openai.breaker.state is State.CLOSED
    result = await openai.prober.probe_once()  # idle now: a timeout counts
    assert result.error and not result.inconclusive
    assert openai.breaker.state is State.OPEN
