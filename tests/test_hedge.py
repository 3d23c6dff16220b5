"""Hedging: a stream whose first token is late is asked of the next provider too."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from gateway.config import ConfigError, load_settings
from gateway.hedge import Hedge
from gateway.server import PROVIDERS
from tests import fake_upstream as fu
from tests.conftest import chat
from tests.fake_upstream import wait_until
from tests.test_streaming import read_stream, text_of

HEDGED = {"per": {"openai": {"hedge_after": 0.2}}}


def hedges(result: str) -> float:
    return REGISTRY.get_sample_value("gateway_hedges_total", {"result": result}) or 0.0


def counts() -> dict[str, float]:
    return {r: hedges(r) for r in ("started", "won", "cancelled", "failed")}


def delta(before: dict[str, float]) -> dict[str, float]:
    return {r: v - before[r] for r, v in counts().items() if v != before[r]}


async def test_a_late_first_token_is_hedged_and_the_hedge_wins(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.stream(delay=20)  # its role chunk at once, its first token after 20 s
    client = await gateway(a, b, **HEDGED)
    before = counts()
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    datas, done = await read_stream(resp)
    assert done and text_of(datas) == b.text
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert resp.headers["x-gateway-failover"] == "true"
    # The primary was asked first, the fallback only once it was late; the primary's
    # request is then cancelled.
    assert len(a.requests) == 1 and len(b.requests) == 1
    await wait_until(lambda: a.disconnects == 1)
    providers = client.app[PROVIDERS]
    assert providers["openai"].breaker.fail_counter == 0
    assert providers["lmstudio"].breaker.fail_counter == 0
    assert providers["openai"].breaker.state.value == "closed"
    assert delta(before) == {"started": 1, "won": 1}
    await wait_until(lambda: all(p.inflight == 0 for p in providers.values()))


async def test_the_first_provider_answering_first_cancels_the_hedge(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    gate = asyncio.Event()
    a.default = fu.stream(gate=gate)
    b.default = fu.stream(gate=asyncio.Event())  # never answers
    client = await gateway(a, b, **HEDGED)
    before = counts()
    request = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(stream=True)))
    await wait_until(lambda: len(b.requests) == 1)  # hedged
    gate.set()  # now the primary answers
    resp = await request
    datas, done = await read_stream(resp)
    assert done and text_of(datas) == a.text
    assert resp.headers["x-gateway-provider"] == "openai"
    await wait_until(lambda: b.disconnects == 1)
    assert client.app[PROVIDERS]["lmstudio"].breaker.fail_counter == 0
    assert delta(before) == {"started": 1, "cancelled": 1}


async def test_no_hedge_when_the_first_token_comes_in_time(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    client = await gateway(a, b, per={"openai": {"hedge_after": 5.0}})
    before = counts()
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    _, done = await read_stream(resp)
    assert done and resp.headers["x-gateway-provider"] == "openai"
    assert not b.requests and delta(before) == {}


async def test_a_failing_hedge_leaves_the_first_provider_to_answer(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    gate = asyncio.Event()
    a.default = fu.stream(gate=gate)
    b.default = fu.server_error(503)
    client = await gateway(a, b, max_retries=0, **HEDGED)
    before = counts()
    base = (
        REGISTRY.get_sample_value(
            "gateway_upstream_attempts_total", {"provider": "lmstudio", "outcome": "server_error"}
        )
        or 0.0
    )

    def attempts(labels):
        return (REGISTRY.get_sample_value("gateway_upstream_attempts_total", labels) or 0.0) - base

    request = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(stream=True)))
    refused = {"provider": "lmstudio", "outcome": "server_error"}
    await wait_until(lambda: attempts(refused) == 1)  # the hedge's 503 is in
    gate.set()
    resp = await request
    _, done = await read_stream(resp)
    assert done and resp.headers["x-gateway-provider"] == "openai"
    assert delta(before) == {"started": 1, "failed": 1}


async def test_client_leaving_during_a_hedge_cancels_both_requests(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    a.default = fu.stream(gate=asyncio.Event())
    b.default = fu.stream(gate=asyncio.Event())
    client = await gateway(a, b, **HEDGED)
    request = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(stream=True)))
    await wait_until(lambda: len(a.requests) == 1 and len(b.requests) == 1)
    request.cancel()
    await wait_until(lambda: a.disconnects == 1 and b.disconnects == 1)
    providers = client.app[PROVIDERS]
    await wait_until(lambda: all(p.inflight == 0 for p in providers.values()))
    assert all(p.breaker.fail_counter == 0 for p in providers.values())


async def test_p95_hedges_a_stream_slower_than_the_providers_recent_ones(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    client = await gateway(a, b, per={"openai": {"hedge_after": "p95"}})
    before = counts()
    for _ in range(20):  # fast first tokens: the provider's p95 is a few milliseconds
        resp = await client.post("/v1/chat/completions", json=chat(stream=True))
        _, done = await read_stream(resp)
        assert done and resp.headers["x-gateway-provider"] == "openai"
    assert delta(before) == {} and not b.requests
    a.then(fu.stream(delay=20))
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    datas, done = await read_stream(resp)
    assert done and resp.headers["x-gateway-provider"] == "lmstudio"
    assert delta(before) == {"started": 1, "won": 1}
    await wait_until(lambda: a.disconnects == 1)


def test_p95_hedges_only_once_it_has_seen_enough_first_tokens():
    hedge = Hedge("p95")
    for i in range(19):
        hedge.observe(i / 10)
    assert hedge.delay() is None
    for i in range(19, 100):
        hedge.observe(i / 10)
    assert hedge.delay() == pytest.approx(9.4)  # the 95th of 0.0 ... 9.9
    assert Hedge(1.5).delay() == 1.5


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("0", "must be positive"),
        ('"p90"', 'must be a number of seconds or "p95"'),
        ("-1", "must not be negative"),
    ],
)
def test_hedge_after_is_checked(tmp_path, value, error):
    path = tmp_path / "gw.toml"
    path.write_text(f"[providers.lmstudio]\nhedge_after = {value}\n")
    with pytest.raises(ConfigError, match=error) as info:
        load_settings({"GATEWAY_CONFIG": str(path)})
    assert info.value.key == "providers.lmstudio.hedge_after"


def test_hedge_after_takes_seconds_or_p95(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text(
        '[providers.lmstudio]\nhedge_after = 2\n[providers.ollama]\nhedge_after = "p95"\n'
    )
    settings = load_settings({"GATEWAY_CONFIG": str(path)})
    assert settings.provider("lmstudio").hedge_after == 2.0
    assert settings.provider("ollama").hedge_after == "p95"
