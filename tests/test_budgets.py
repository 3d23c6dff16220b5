"""Rate budgets (issue 17): per-provider rpm/tpm buckets, budgets learned from headers, the
shared FIFO queue and overflow, and per-client quotas.

Every assertion is on counts, statuses, headers and states, never on how long anything took.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

import tests.fake_upstream as fu
from gateway.auth import AccessPolicy, digest
from gateway.budgets import Bucket, Budget, estimate_tokens, format_duration
from gateway.call import Call
from gateway.config import ConfigError, load_settings
from gateway.errors import parse_duration
from gateway.quotas import ClientKey, QuotaSettings
from gateway.server import PROVIDERS
from tests.conftest import chat
from tests.fake_upstream import wait_until

# -- the buckets, on an explicit clock --------------------------------------------------


def test_bucket_refills_continuously_up_to_its_capacity():
    b = Bucket(rate=2.0, capacity=2.0, at=100.0)
    assert b.wait(1, 100.0) == 0
    b.take(1, 100.0)
    b.take(1, 100.0)
    assert b.wait(1, 100.0) == pytest.approx(0.5)  # 2 a second: one more in 0.5 s
    assert b.wait(1, 100.0, ahead=3) == pytest.approx(2.0)  # behind three in line
    assert b.refill(110.0) == 2.0  # never more than the capacity
    b.take(5, 110.0)  # larger than the bucket: taken when full, leaving a debt
    assert b.level == -3.0
    assert b.wait(1, 110.0) == pytest.approx(2.0)


def test_bucket_observes_an_upstream_that_says_less_is_left():
    b = Bucket(rate=1.0, capacity=10.0, at=0.0)
    b.observe(remaining=4, reset=None, at=0.0)
    assert b.refill(0.0) == 4
    b.observe(remaining=8, reset=None, at=0.0)  # never raises what is left
    assert b.refill(0.0) == 4
    b.observe(remaining=0, reset=2.0, at=0.0)  # empty: nothing until the reset...
    assert b.wait(1, 0.0) == pytest.approx(2.0)
    assert b.wait(1, 1.999) > 0
    assert b.wait(1, 2.0) == 0
    assert b.refill(2.0) == 10.0  # ...when the upstream's budget is whole again


def test_durations_in_openai_format_round_trip():
    for seconds in (0.02, 0.5, 1, 1.5, 59.99, 60, 360, 3723.5):
        text = format_duration(seconds)
        assert parse_duration(text) == pytest.approx(seconds, abs=0.01), text
    assert format_duration(360) == "6m0s"
    assert format_duration(0.0201) == "21ms"  # rounded up: never earlier than it is


def _call(body: dict[str, Any], endpoint: str = "chat/completions") -> Call:
    import orjson

    raw = orjson.dumps(body)
    return Call(endpoint, body, raw, body.get("model", ""), False, "id", 0.0)


def test_token_estimate_is_the_body_size_over_four_plus_the_output_asked_for():
    body = chat(max_tokens=100)
    call = _call(body)
    prompt = -(-len(call.raw) // 4)
    assert estimate_tokens(call) == prompt + 100
    assert estimate_tokens(_call(chat(max_completion_tokens=50, n=2))) > 100
    assert estimate_tokens(_call(chat())) == -(-len(_call(chat()).raw) // 4) + 256
    embed = _call({"model": "e", "input": "x" * 400}, "embeddings")
    assert estimate_tokens(embed) == -(-len(embed.raw) // 4)  # no output tokens
    # Untrusted numbers do not break it: a negative or absurd max_tokens is ignored.
    odd = _call(chat(max_tokens=-5))
    assert estimate_tokens(odd) == -(-len(odd.raw) // 4) + 256


def test_budget_learned_from_headers_takes_the_upstreams_refill_rate():
    budget = Budget("p", rpm=0, tpm=0, burst_seconds=1.0, reset_cap=300)
    assert not budget.active
    budget.learn({"x-ratelimit-remaining-requests": "99"})  # no limit: nothing to learn
    assert not budget.active
    budget.learn(
        {
            "x-ratelimit-limit-requests": "600",
            "x-ratelimit-remaining-requests": "599",
            "x-ratelimit-reset-requests": "100ms",  # 1 request back in 0.1 s: 10 a second
            "x-ratelimit-limit-tokens": "nan",  # absurd: ignored
            "x-ratelimit-remaining-tokens": "-1",
        }
    )
    assert budget.active and budget.tokens is None
    report = budget.report()
    assert report is not None
    assert report["requests"]["per_minute"] == pytest.approx(600)
    assert report["requests"]["burst"] == pytest.approx(10)  # one second's worth
    assert report["requests"]["remaining"] == pytest.approx(10)  # full: 599 are left
    assert report["requests"]["source"] == "learned"


def test_configured_budget_keeps_its_rate_and_learns_only_what_is_left():
    budget = Budget("p", rpm=60, tpm=0, burst_seconds=2.0, reset_cap=300)
    headers = {
        "x-ratelimit-limit-requests": "10000",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "6m0s",  # clamped to the provider's reset cap
    }
    budget.learn(headers)
    report = budget.report()
    assert report is not None
    assert report["requests"]["per_minute"] == 60 and report["requests"]["burst"] == 2
    assert report["requests"]["remaining"] == 0
    assert report["requests"]["full_in_s"] == pytest.approx(300, abs=1)


# -- the gateway ------------------------------------------------------------------------


async def _steady_load(client: Any, count: int, every: float) -> list[int]:
    """``count`` requests started one every ``every`` seconds (not waiting for answers)."""

    async def one() -> int:
        async with client.post("/v1/chat/completions", json=chat()) as resp:
            await resp.read()
            return resp.status

    tasks = []
    for _ in range(count):
        tasks.append(asyncio.ensure_future(one()))
        await asyncio.sleep(every)
    return list(await asyncio.gather(*tasks))


async def _upstream_429s(gateway: Any, upstreams: Any, **budget: Any) -> tuple[int, int, int]:
    """Drive 40 requests at 20 a second through a primary that allows 5 a second (as a
    bucket of one second's worth) and an unlimited fallback; returns the primary's 429s,
    the requests it served and those the fallback served."""
    limited, spare = await upstreams("limited"), await upstreams("spare")
    limited.rpm = 300
    client = await gateway(
        limited,
        spare,
        max_retries=0,
        fail_max=1_000_000,  # a 429 must not open the breaker: every request tries again
        per={"openai": {"max_queue_wait": 0.5, **budget}},
    )
    statuses = await _steady_load(client, 40, 0.05)
    assert statuses == [200] * 40  # overflow and failover lose nothing
    served = len(limited.requests) - limited.refused
    return limited.refused, served, len(spare.requests)


async def test_a_budget_keeps_the_upstreams_429s_at_zero(gateway, upstreams, capsys):
    without, served_without, _ = await _upstream_429s(gateway, upstreams)
    # 10% under the upstream's own limit: requests arrive a little after they are admitted.
    with_budget, served_with, overflow = await _upstream_429s(gateway, upstreams, rpm=270)
    with capsys.disabled():
        print(
            f"\nupstream 429s at 20 req/s against 5 req/s: without budgets {without} "
            f"(served {served_without}), with rpm=270 {with_budget} (served {served_with}, "
            f"{overflow} overflowed to the fallback)"
        )
    assert without >= 10
    assert with_budget == 0
    assert served_with > 0 and overflow > 0


async def test_budget_learned_from_headers_holds_requests_until_the_reset(gateway, upstreams):
    a = await upstreams("a")
    spent = {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "2s",
    }
    a.then(fu.ok(headers=spent))
    client = await gateway(a)  # no rpm configured
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.status == 200
    refused = 0
    for _ in range(100):  # bounded: the reset is 2 s away, this polls for up to 10 s
        resp = await client.post("/v1/chat/completions", json=chat())
        body = await resp.json()
        if resp.status == 200:
            break
        assert resp.status == 429, body
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert "out_of_budget" in body["error"]["message"]
        assert 1 <= int(resp.headers["Retry-After"]) <= 3
        assert len(a.requests) == 1  # the upstream received nothing more
        refused += 1
        await asyncio.sleep(0.1)
    assert resp.status == 200 and len(a.requests) == 2
    assert refused >= 1


async def test_budget_queue_is_fifo_and_shared_with_the_concurrency_limit(gateway, upstreams):
    a = await upstreams("a")
    client = await gateway(a, rpm=120, burst_seconds=0.5, max_queue_wait=10)  # 2 a second
    limiter = client.app[PROVIDERS]["openai"].limiter

    def body(i: int) -> dict[str, Any]:
        b = chat()
        b["messages"][0]["content"] = str(i)
        return b

    tasks = []
    for i in range(4):
        tasks.append(asyncio.ensure_future(client.post("/v1/chat/completions", json=body(i))))
        await wait_until(lambda i=i: len(a.requests) + limiter.queued == i + 1)
    assert limiter.queued >= 2  # waiting for budget, in the limiter's one queue
    statuses = [r.status for r in await asyncio.gather(*tasks)]
    assert statuses == [200] * 4
    assert [r["messages"][0]["content"] for r in a.requests] == ["0", "1", "2", "3"]


async def test_every_provider_out_of_budget_is_429_with_the_earliest_refill(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    client = await gateway(
        a, b, max_queue_wait=0.2, per={"openai": {"rpm": 6}, "lmstudio": {"rpm": 4}}
    )
    providers = [r.headers["x-gateway-provider"] for r in [await _post(client) for _ in range(2)]]
    assert providers == ["openai", "lmstudio"]  # one each: then both are spent
    resp = await _post(client)
    body = await resp.json()
    assert resp.status == 429, body
    assert body["error"]["code"] == "rate_limit_exceeded"
    # OpenAI refills first (one in 10 s, LM Studio in 15 s); jittered up by at most 20 %.
    assert 9 <= int(resp.headers["Retry-After"]) <= 12
    assert body["error"]["message"].count("out_of_budget") == 2
    assert (len(a.requests), len(b.requests)) == (1, 1)
    metrics = await (await client.get("/metrics")).text()
    assert 'gateway_upstream_attempts_total{outcome="out_of_budget",provider="openai"}' in metrics
    assert 'gateway_budget_remaining{kind="requests",provider="openai"}' in metrics
    report = await (await client.get("/admin/providers")).json()
    budget = report["providers"][0]["budget"]
    assert budget["requests"]["per_minute"] == 6 and budget["requests"]["source"] == "configured"
    assert budget["requests"]["remaining"] < 1
    assert report["providers"][1]["budget"]["requests"]["per_minute"] == 4


async def test_no_budget_configured_reports_none(gateway, upstreams):
    a = await upstreams("a")
    client = await gateway(a)
    await _post(client)  # the fake's remaining header alone (no limit) teaches nothing
    report = await (await client.get("/admin/providers")).json()
    assert report["providers"][0]["budget"] is None
    assert not client.app[PROVIDERS]["openai"].budget.active


async def test_cancelled_while_waiting_for_budget_frees_its_place(gateway, upstreams):
    a = await upstreams("a")
    # One request a second, one place in the queue.
    client = await gateway(a, rpm=60, max_queue=1, max_queue_wait=5)
    limiter = client.app[PROVIDERS]["openai"].limiter
    assert (await _post(client)).status == 200  # spends the budget
    waiting = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat()))
    await wait_until(lambda: limiter.queued == 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await wait_until(lambda: limiter.queued == 0)
    # Its place is free (with it taken, this one would be refused at once: the queue holds
    # one), and it never spent the budget: the next request gets the first refill.
    resp = await _post(client)
    assert resp.status == 200 and resp.headers["x-gateway-provider"] == "openai"
    assert len(a.requests) == 2
    assert limiter.in_use == 0 and limiter.queued == 0


async def _post(client: Any, key: str | None = None, **body: Any) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    resp = await client.post("/v1/chat/completions", json=chat(**body), headers=headers)
    await resp.read()
    return resp


def _clients(**keys: ClientKey) -> dict[str, Any]:
    """Settings for client keys named like the keyword arguments, with their quotas."""
    return {
        "access": AccessPolicy(client_keys=frozenset(digest(k) for k in keys)),
        "quotas": QuotaSettings(keys={digest(k): v for k, v in keys.items()}),
    }


async def test_client_over_its_quota_gets_429_and_others_are_served(gateway, upstreams):
    a = await upstreams("a")
    settings = _clients(alice=ClientKey("alice", rpm=2), bob=ClientKey("bob", rpm=2))
    client = await gateway(a, settings=settings)
    assert [(await _post(client, "alice")).status for _ in range(2)] == [200, 200]
    resp = await _post(client, "alice")
    body = await resp.json()
    assert resp.status == 429, body
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests"
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.headers["x-ratelimit-limit-requests"] == "2"
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert parse_duration(resp.headers["x-ratelimit-reset-requests"]) > 0
    assert resp.headers["x-gateway-attempts"] == "0"
    assert len(a.requests) == 2  # the refused request never reached a provider
    assert (await _post(client, "bob")).status == 200  # bob's share is his own
    assert len(a.requests) == 3
    metrics = await (await client.get("/metrics", headers={"Authorization": "Bearer bob"})).text()
    assert 'gateway_client_quota_refusals_total{client="alice",kind="requests"} 1.0' in metrics
    assert 'gateway_client_quota_refusals_total{client="bob",kind="requests"} 0.0' in metrics


async def test_client_token_quota_is_corrected_from_usage(gateway, upstreams):
    a = await upstreams("a")  # answers with usage: 15 tokens in all
    client = await gateway(a, settings=_clients(carol=ClientKey("carol", tpm=1000)))
    # Each is estimated at about 930 tokens: without the correction the second would not
    # fit in 1000 a minute.
    for _ in range(3):
        assert (await _post(client, "carol", max_tokens=900)).status == 200
    resp = await _post(client, "carol", max_tokens=5000)  # needs a full bucket
    assert resp.status == 429
    assert (await resp.json())["error"]["type"] == "tokens"
    assert resp.headers["x-ratelimit-limit-tokens"] == "1000"
    assert len(a.requests) == 3


async def test_provider_token_budget_is_corrected_from_usage(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    client = await gateway(a, b, max_queue_wait=0.1, per={"openai": {"tpm": 60_000}})
    # 1000 tokens a second, the bucket holds 1000: each request is estimated at about 930.
    providers = [
        (await _post(client, max_tokens=900)).headers["x-gateway-provider"] for _ in range(3)
    ]
    assert providers == ["openai"] * 3  # corrected to 15 used: room for the next at once
    a.default = fu.ok(usage={"prompt_tokens": 900, "completion_tokens": 900})
    await _post(client, max_tokens=900)  # uses more than estimated: the bucket owes
    resp = await _post(client, max_tokens=900)
    assert resp.headers["x-gateway-provider"] == "lmstudio"  # moved on: out of budget
    assert len(a.requests) == 4


# -- configuration ----------------------------------------------------------------------


def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def test_keys_file_lines_carry_name_and_quotas(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(
        f"{_key('plain')}\n"
        f"{_key('alice').upper()}  name=alice rpm=60 tpm=90000  # team A\n"
        f"{_key('bob')} tpm=5000\n"
    )
    config = tmp_path / "gateway.toml"
    config.write_text("[clients]\ndefault_rpm = 30\n")
    s = load_settings({"GATEWAY_API_KEYS_FILE": str(keys), "GATEWAY_CONFIG": str(config)})
    assert s.access.client_keys == {_key("plain"), _key("alice"), _key("bob")}
    assert s.quotas.default_rpm == 30 and s.quotas.default_tpm == 0
    assert s.quotas.keys == {
        _key("alice"): ClientKey("alice", 60.0, 90000.0),
        _key("bob"): ClientKey(None, None, 5000.0),
    }
    assert _key("alice") not in repr(s)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("name=x", "not a SHA-256 hex digest"),
        ("{key} rpm", "expected name=NAME, rpm=N or tpm=N"),
        ("{key} sk-secret-pasted-here", "expected name=NAME, rpm=N or tpm=N"),
        ("{key} rpm=1 rpm=2", "rpm= given twice"),
        ("{key} rpm=lots", "rpm= must be a finite number"),
        ("{key} tpm=-1", "tpm= must be a finite number"),
        ("{key} name=bad/name", "name= must be"),
    ],
)
def test_bad_keys_file_lines_name_the_line(tmp_path, line, problem):
    keys = tmp_path / "keys"
    keys.write_text("# header\n" + line.format(key=_key("k")) + "\n")
    with pytest.raises(ConfigError, match="api_keys_file: line 2 of") as e:
        load_settings({"GATEWAY_API_KEYS_FILE": str(keys)})
    assert problem in str(e.value)
    assert "sk-secret" not in str(e.value) and "lots" not in str(e.value)


def test_client_defaults_need_client_keys(tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text("[clients]\ndefault_tpm = 1000\n")
    with pytest.raises(ConfigError, match=r"clients\.default_tpm: applies to client keys"):
        load_settings({"GATEWAY_CONFIG": str(config)})
    config.write_text("[clients]\nburst = 3\n")
    with pytest.raises(ConfigError, match=r"clients\.burst: unknown setting"):
        load_settings({"GATEWAY_CONFIG": str(config), "GATEWAY_API_KEYS": "k"})


def test_provider_budget_settings(tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text(
        "[defaults]\nburst_seconds = 2\n[providers.openai]\nrpm = 500\ntpm = 200000\n"
    )
    s = load_settings({"GATEWAY_CONFIG": str(config), "OPENAI_API_KEY": "sk-x"})
    openai = s.provider("openai")
    assert (openai.rpm, openai.tpm, openai.burst_seconds) == (500, 200000, 2)
    config.write_text("[providers.openai]\nburst_seconds = 0\n")
    with pytest.raises(ConfigError, match=r"providers\.openai\.burst_seconds: must be positive"):
        load_settings({"GATEWAY_CONFIG": str(config), "OPENAI_API_KEY": "sk-x"})
    config.write_text("[providers.openai]\nrpm = -1\n")
    with pytest.raises(ConfigError, match=r"providers\.openai\.rpm: must not be negative"):
        load_settings({"GATEWAY_CONFIG": str(config), "OPENAI_API_KEY": "sk-x"})
