"""``/metrics`` after scripted traffic: exactly the expected counter deltas.

The default Prometheus registry is process-global, so every test compares a scrape taken
before its traffic with one taken after. Counters (``*_total``) and histogram counts
(``*_count``) of every ``gateway_*`` metric are compared, so a metric that moves when it
should not fails the test too.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from breakers import State
from gateway.server import PROVIDERS
from tests.conftest import chat
from tests.fake_upstream import (
    chunk,
    drop_after,
    hang_up,
    rate_limited,
    server_error,
    sse,
    stream,
    wait_until,
)

Key = tuple[str, tuple[tuple[str, str], ...]]


def key(name: str, **labels: str) -> Key:
    return name, tuple(sorted(labels.items()))


def parse(text: str) -> dict[Key, float]:
    """Every gateway sample of the exposition text, by (name, labels)."""
    out: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("gateway_"):
            continue
        for s in family.samples:
            out[key(s.name, **s.labels)] = s.value
    return out


def counts(samples: dict[Key, float]) -> dict[Key, float]:
    """Counter totals and histogram counts (what traffic makes grow)."""
    return {k: v for k, v in samples.items() if k[0].endswith(("_total", "_count"))}


async def scrape(client: Any) -> dict[Key, float]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    return parse(await resp.text())


def deltas(before: dict[Key, float], after: dict[Key, float]) -> dict[Key, float]:
    b, a = counts(before), counts(after)
    out = {k: a[k] - b.get(k, 0.0) for k in a if a[k] != b.get(k, 0.0)}
    gone = [k for k in b if k not in a]
    assert not gone, f"series disappeared: {gone}"
    return out


def requests(model: str, provider: str, status: int, stream: bool, n: float) -> dict[Key, float]:
    """The request counter and the duration histogram count for one kind of request."""
    s = "true" if stream else "false"
    return {
        key(
            "gateway_requests_total", model=model, provider=provider, status=str(status), stream=s
        ): n,
        key("gateway_request_duration_seconds_count", model=model, provider=provider, stream=s): n,
    }


def attempt(provider: str, outcome: str, n: float = 1) -> dict[Key, float]:
    return {key("gateway_upstream_attempts_total", provider=provider, outcome=outcome): n}


def failover(src: str, dst: str, reason: str, n: float = 1) -> dict[Key, float]:
    name = "gateway_failovers_total"
    return {key(name, from_provider=src, to_provider=dst, reason=reason): n}


def transition(provider: str, old: str, new: str) -> dict[Key, float]:
    name = "gateway_breaker_transitions_total"
    return {key(name, provider=provider, from_state=old, to_state=new): 1}


def tokens(provider: str, prompt: float, completion: float) -> dict[Key, float]:
    return {
        key("gateway_tokens_total", provider=provider, kind="prompt"): prompt,
        key("gateway_tokens_total", provider=provider, kind="completion"): completion,
    }


def overhead(n: float) -> dict[Key, float]:
    return {key("gateway_overhead_seconds_count"): n}


def merge(*parts: dict[Key, float]) -> dict[Key, float]:
    out: dict[Key, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


def breaker_state(samples: dict[Key, float], provider: str) -> float:
    return samples[key("gateway_breaker_state", provider=provider)]


async def test_failover_and_breaker_cycle(upstreams, gateway):
    """429 and 503 fail over and open the breaker; a skip fails over; a trial closes it."""
    up1, up2 = await upstreams("openai"), await upstreams("lmstudio")
    up1.then(rate_limited(), server_error(503))
    client = await gateway(up1, up2, fail_max=2, max_retries=0, reset_timeout=0.2)
    before = await scrape(client)

    for _ in range(2):  # rate limited, then a server error: the breaker opens
        resp = await client.post("/v1/chat/completions", json=chat())
        assert resp.status == 200
        assert resp.headers["x-gateway-provider"] == "lmstudio"
    resp = await client.post("/v1/chat/completions", json=chat())  # skipped, no network
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    assert len(up1.requests) == 2
    opened = await scrape(client)
    assert breaker_state(opened, "openai") == 2
    assert deltas(before, opened) == merge(
        requests("other", "lmstudio", 200, False, 3),
        attempt("openai", "rate_limited"),
        attempt("openai", "server_error"),
        attempt("openai", "breaker_open"),
        attempt("lmstudio", "ok", 3),
        failover("openai", "lmstudio", "rate_limited"),
        failover("openai", "lmstudio", "server_error"),
        failover("openai", "lmstudio", "breaker_open"),
        transition("openai", "closed", "open"),
        tokens("lmstudio", 27, 18),
        overhead(3),
    )

    await asyncio.sleep(0.25)  # past reset_timeout: the next request is the trial
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.headers["x-gateway-provider"] == "openai"
    closed = await scrape(client)
    assert breaker_state(closed, "openai") == 0
    assert deltas(opened, closed) == merge(
        requests("other", "openai", 200, False, 1),
        attempt("openai", "ok"),
        transition("openai", "open", "half_open"),
        transition("openai", "half_open", "closed"),
        tokens("openai", 9, 6),
        overhead(1),
    )


async def test_streaming_failover_counts_ttft_of_the_answering_provider(upstreams, gateway):
    """A stream that fails over before its first token: one failover, TTFT for LM Studio."""
    up1, up2 = await upstreams("openai"), await upstreams("lmstudio")
    up1.then(hang_up(), hang_up())  # the second is after the stale-connection resend
    client = await gateway(up1, up2, max_retries=0)
    before = await scrape(client)
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert resp.status == 200
    body = await resp.read()
    assert body.endswith(b"data: [DONE]\n\n")
    after = await scrape(client)
    assert deltas(before, after) == merge(
        requests("other", "lmstudio", 200, True, 1),
        attempt("openai", "unreachable"),
        attempt("lmstudio", "ok"),
        failover("openai", "lmstudio", "unreachable"),
        {key("gateway_time_to_first_token_seconds_count", provider="lmstudio"): 1},
        overhead(1),
    )


async def test_client_disconnect_mid_stream(upstreams, gateway):
    """The client leaves after the first chunk: one disconnect, no breaker verdict."""
    up1 = await upstreams("openai")
    up1.then(stream(tokens=6, chunk_delay=0.2))
    client = await gateway(up1)
    provider = client.app[PROVIDERS]["openai"]
    before = await scrape(client)
    disconnects = REGISTRY.get_sample_value("gateway_client_disconnects_total") or 0.0

    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert resp.status == 200
    first = await resp.content.readany()
    assert first.startswith(b"data: ")
    resp.close()
    await wait_until(lambda: up1.disconnects == 1)
    await wait_until(
        lambda: REGISTRY.get_sample_value("gateway_client_disconnects_total") == disconnects + 1
    )
    await wait_until(lambda: provider.inflight == 0)

    after = await scrape(client)
    assert deltas(before, after) == merge(
        requests("other", "openai", 200, True, 1),  # the status line had gone out
        attempt("openai", "ok"),
        {key("gateway_client_disconnects_total"): 1},
        {key("gateway_time_to_first_token_seconds_count", provider="openai"): 1},
        overhead(1),
    )
    assert breaker_state(after, "openai") == 0
    assert provider.breaker.fail_counter == 0
    assert after[key("gateway_inflight_requests", provider="openai")] == 0


async def test_stream_cut_dropped_event_and_all_failed(upstreams, gateway):
    """A cut after commit, a malformed event after commit, and a request nobody answered."""
    up1, up2 = await upstreams("openai"), await upstreams("lmstudio")
    malformed = chunk("Hi") + b"data: {not json\n\n" + chunk(finish="stop") + b"data: [DONE]\n\n"
    up1.then(drop_after(2), sse(malformed), server_error(500))
    up2.then(server_error(502))
    client = await gateway(up1, up2, max_retries=0, fail_max=5)
    before = await scrape(client)

    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    cut = await resp.read()
    assert b"stream_interrupted" in cut and b"[DONE]" not in cut
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    resp = await client.post("/v1/chat/completions", json=chat(model="local-model"))
    assert resp.status == 503

    after = await scrape(client)
    assert deltas(before, after) == merge(
        requests("other", "openai", 200, True, 2),
        requests("local-model", "none", 503, False, 1),  # a configured model keeps its name
        attempt("openai", "ok", 2),
        attempt("openai", "server_error"),
        attempt("lmstudio", "server_error"),
        failover("openai", "lmstudio", "server_error"),
        {key("gateway_stream_interruptions_total", provider="openai", reason="unreachable"): 1},
        {key("gateway_stream_events_dropped_total", provider="openai"): 1},
        {key("gateway_time_to_first_token_seconds_count", provider="openai"): 2},
        overhead(3),
    )


async def test_probes_set_provider_up_and_breaker_state(upstreams, gateway):
    """Probes: up is 1 for a healthy provider, 0 for a failing one whose breaker opens."""
    up1, up2 = await upstreams("openai"), await upstreams("lmstudio")
    up2.models_status = 503
    client = await gateway(up1, up2, probes=True, probe_interval=0.05, fail_max=1)
    providers = client.app[PROVIDERS]

    def sample(name: str, provider: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"provider": provider})

    before = await scrape(client)
    await wait_until(lambda: providers["lmstudio"].breaker.state is State.OPEN)
    await wait_until(lambda: up1.probes >= 1 and sample("gateway_provider_up", "openai") == 1)
    after = await scrape(client)
    assert after[key("gateway_provider_up", provider="openai")] == 1
    assert after[key("gateway_provider_up", provider="lmstudio")] == 0
    assert breaker_state(after, "lmstudio") == 2
    grown = deltas(before, after)
    assert grown[key("gateway_probe_duration_seconds_count", provider="openai")] >= 1
    assert grown[key("gateway_probe_duration_seconds_count", provider="lmstudio")] >= 1
    assert (
        grown[
            key(
                "gateway_breaker_transitions_total",
                provider="lmstudio",
                from_state="closed",
                to_state="open",
            )
        ]
        == 1
    )
    assert not any(k[0] == "gateway_requests_total" for k in grown)
