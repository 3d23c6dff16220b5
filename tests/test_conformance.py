"""Fault-injection conformance: one test per scenario, and the README table they prove.

Each scenario scripts the primary provider (OpenAI's place) with one fault, the fallback
(LM Studio's place) answers normally (or, in a rescue row, answers the restarted request), and the test asserts what the client sees, who
answered, the attempts, the primary's breaker and the metric that counts it. The README's
"Failure behaviour" table is rendered from :data:`SCENARIOS`; ``python -m
tests.test_conformance`` prints it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from gateway.server import PROVIDERS
from tests import fake_upstream as fu
from tests.conftest import chat
from tests.test_streaming import read_stream, text_of

FALLBACK = "full answer from the fallback"
PARTIAL = "partial answer, then one error event, no `[DONE]`"
COMPLETE = "full answer from the primary"
RESCUED = (
    "full answer: the primary's tokens, then the rest of the fallback's (verified), one `[DONE]`"
)
AS_IS = "the upstream's own error, as is"


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: Callable[[], fu.Behaviour] | None  # None: the primary's port refuses connections
    stream: bool
    sees: str
    metric: tuple[str, dict[str, str]]  # a counter that goes up by exactly one
    breaker: str = "open"  # the primary's breaker afterwards (fail_max is 1)
    status: int = 200
    overrides: dict[str, Any] = field(default_factory=dict)
    text: bool = True  # the answer has content text (an empty answer, or only reasoning, not)
    fallback: Callable[[], fu.Behaviour] | None = None  # the fallback's own fault, if any
    hung: bool = False  # the primary's model list hangs too (probes run)
    # With x-gateway-rescue: on, what the fallback answers the restarted request with.
    rescue: Callable[[], fu.Behaviour] | None = None

    @property
    def provider(self) -> str:
        if self.rescue is not None:  # the headers went out with the primary's first token
            return "openai"
        return "lmstudio" if self.sees == FALLBACK or self.fallback else "openai"

    @property
    def attempts(self) -> int:
        if self.rescue is not None:
            return 1
        return 2 if self.sees == FALLBACK or self.fallback else 1


def attempts_metric(outcome: str) -> tuple[str, dict[str, str]]:
    return "gateway_upstream_attempts_total", {"provider": "openai", "outcome": outcome}


def cut_metric(reason: str) -> tuple[str, dict[str, str]]:
    return "gateway_stream_interruptions_total", {"provider": "openai", "reason": reason}


def rescue_metric(result: str) -> tuple[str, dict[str, str]]:
    return "gateway_stream_rescues_total", {"result": result}


def other_answer() -> fu.Behaviour:
    return fu.stream(words=("Something", " else", " entirely", "."))


def opened_metric() -> tuple[str, dict[str, str]]:
    return "gateway_breaker_transitions_total", {"provider": "openai", "from_state": "closed", "to_state": "open"}  # fmt: skip


def refusal() -> fu.Behaviour:
    return fu.openai_error(500, "Unsupported param: response_format", "server_error", None)


def header_error(status: int) -> Callable[[], fu.Behaviour]:
    return lambda: fu.server_error(status)


def malformed_after_commit() -> fu.Behaviour:
    return fu.sse(
        fu.chunk("Hi") + b"data: {broken\n\n" + fu.chunk(finish="stop") + b"data: [DONE]\n\n"
    )


def error_event() -> fu.Behaviour:
    return fu.sse(
        b'data: {"error": {"message": "The server is overloaded", "type": "server_error", "code": null}}\n\n'
    )


FAST_TIMEOUTS = {"first_token_timeout": 0.3, "response_timeout": 0.3, "idle_timeout": 0.3}

SCENARIOS = [
    Scenario("429 with `Retry-After: 30`", lambda: fu.rate_limited(retry_after=30), False, FALLBACK, attempts_metric("rate_limited")),
    Scenario("429 without `Retry-After` (retries spent)", fu.rate_limited, False, FALLBACK, attempts_metric("rate_limited")),
    Scenario("429 `insufficient_quota`", fu.insufficient_quota, False, FALLBACK, attempts_metric("quota_exhausted")),
    Scenario("500", header_error(500), False, FALLBACK, attempts_metric("server_error")),
    Scenario("502", header_error(502), True, FALLBACK, attempts_metric("server_error")),
    Scenario("503", header_error(503), False, FALLBACK, attempts_metric("server_error")),
    Scenario("529 (overloaded)", header_error(529), True, FALLBACK, attempts_metric("server_error")),
    Scenario("connection refused", None, True, FALLBACK, attempts_metric("unreachable")),
    Scenario("connection reset after the headers", lambda: fu.drop_after(0, role_chunk=False), True, FALLBACK, attempts_metric("unreachable")),
    Scenario("silent upstream (accepts, never answers)", fu.silent, False, FALLBACK, attempts_metric("timeout"), overrides=FAST_TIMEOUTS),
    Scenario("slow first token", lambda: fu.stream(delay=5), True, FALLBACK, attempts_metric("timeout"), overrides=FAST_TIMEOUTS),
    Scenario("error event inside a 200 stream, before any token", error_event, True, FALLBACK, attempts_metric("server_error")),
    Scenario("malformed chunk before the first token", lambda: fu.sse(b"data: {not json\n\n"), True, FALLBACK, attempts_metric("bad_response")),
    Scenario("wrong `Content-Length` (body cut short)", fu.wrong_length, False, FALLBACK, attempts_metric("unreachable")),
    Scenario("stream cut after 3 tokens", lambda: fu.drop_after(3), True, PARTIAL, cut_metric("unreachable")),
    Scenario("stream cut after 3 tokens, rescue on, the fallback reproduces them", lambda: fu.drop_after(3), True, RESCUED, rescue_metric("rescued"), rescue=fu.stream),
    Scenario("stream cut after 3 tokens, rescue on, the fallback answers otherwise", lambda: fu.drop_after(3), True, PARTIAL, rescue_metric("diverged"), rescue=other_answer),
    Scenario("stream stalls after 3 tokens", lambda: fu.stall_after(3), True, PARTIAL, cut_metric("timeout"), overrides=FAST_TIMEOUTS),
    Scenario("stream ends without `finish_reason`", lambda: fu.stream(finish=False, done=False), True, PARTIAL, cut_metric("bad_response")),
    Scenario("`[DONE]` before any `finish_reason` (an interrupted server)", lambda: fu.sse(fu.chunk("Hi") + b"data: [DONE]\n\n"), True, PARTIAL, cut_metric("bad_response")),
    Scenario("missing `[DONE]` after `finish_reason`", lambda: fu.stream(done=False), True, COMPLETE, attempts_metric("ok"), breaker="closed"),
    Scenario("malformed chunk after the first token", malformed_after_commit, True, COMPLETE, ("gateway_stream_events_dropped_total", {"provider": "openai"}), breaker="closed"),
    Scenario("a single 600 KB event", lambda: fu.stream(big=600_000), True, COMPLETE, attempts_metric("ok"), breaker="closed"),
    Scenario("400 invalid request", fu.bad_request, False, AS_IS, attempts_metric("client_error"), breaker="closed", status=400),
    Scenario("400 `content_policy_violation`", fu.content_refused, True, AS_IS, attempts_metric("content_refused"), breaker="closed", status=400),
    Scenario("400 `context_length_exceeded`", fu.context_too_long, False, FALLBACK, attempts_metric("context_too_long"), breaker="closed"),
    Scenario("reads the request, then hangs up", fu.hang_up, False, FALLBACK, attempts_metric("unreachable")),
    Scenario("reads the request, hangs up after 0.5 s of silence", lambda: fu.hang_up(after=0.5), True, FALLBACK, attempts_metric("unreachable")),
    Scenario("`finish_reason` on the first and only content chunk", fu.one_chunk, True, COMPLETE, attempts_metric("ok"), breaker="closed"),
    Scenario("empty answer (a role chunk, then only a `finish_reason`)", fu.empty, True, COMPLETE, attempts_metric("ok"), breaker="closed", text=False),
    Scenario("thinking in `delta.reasoning` (Ollama), slower than the first-token timeout", lambda: fu.stream(field="reasoning", tokens=4, chunk_delay=0.2), True, COMPLETE, attempts_metric("ok"), breaker="closed", overrides=FAST_TIMEOUTS, text=False),
    Scenario("`n = 2`, choice 1 cut before its `finish_reason`", lambda: fu.stream(n=2, cut_choice=1), True, PARTIAL, cut_metric("bad_response")),
    Scenario('`"error": null` in every chunk', lambda: fu.stream(error_null=True), True, COMPLETE, attempts_metric("ok"), breaker="closed"),
    Scenario("`Content-Type: Text/Event-Stream`", lambda: fu.stream(content_type="Text/Event-Stream"), True, COMPLETE, attempts_metric("ok"), breaker="closed"),
    Scenario("body ends in a later read than `[DONE]`", lambda: fu.stream(end_delay=0.1), True, COMPLETE, attempts_metric("ok"), breaker="closed"),
    Scenario("hung (accepts, answers nothing, its model list hangs too)", fu.silent, True, FALLBACK, opened_metric(), overrides={"probe_timeout": 0.2, "first_token_timeout": 60}, hung=True),
    Scenario("a request-fault 500 (`Unsupported param`) from the fallback too", refusal, False, AS_IS, attempts_metric("server_error"), breaker="closed", status=500, fallback=refusal),
    Scenario("a request-fault 500 (`Unsupported param`) that the fallback answers", refusal, False, FALLBACK, attempts_metric("server_error")),
]  # fmt: skip


def metric(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("s", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_scenario(s: Scenario, gateway, upstreams, refused_url):
    b = await upstreams("b")
    if s.fallback is not None:
        b.default = s.fallback()
    if s.rescue is not None:
        b.default = s.rescue()
    if s.fault is None:
        primary: Any = refused_url
    else:
        primary = await upstreams("a")
        primary.default = s.fault()
        if s.hung:
            primary.models_delay = 3600
    probes = {"probes": True, "probe_interval": 0.05} if s.hung else {}
    client = await gateway(
        primary,
        b,
        fail_max=1,
        max_retries=0,
        reset_timeout=60,
        per={"openai": s.overrides},
        **probes,
    )
    before = metric(*s.metric)
    headers = {"x-gateway-rescue": "on"} if s.rescue is not None else {}
    resp = await client.post("/v1/chat/completions", json=chat(stream=s.stream), headers=headers)
    assert resp.status == s.status
    assert resp.headers["x-gateway-provider"] == s.provider
    assert resp.headers["x-gateway-attempts"] == str(s.attempts)
    if s.sees == AS_IS:
        err = (await resp.json())["error"]
        assert err == primary.default.body["error"]
    elif s.stream:
        datas, done = await read_stream(resp)
        if s.sees == PARTIAL:
            assert not done
            assert text_of(datas[:-1])
            assert datas[-1]["error"]["code"] == "stream_interrupted"
            assert sum("error" in d for d in datas) == 1
        else:
            assert done
            assert not any(d.get("error") is not None for d in datas)
            assert bool(text_of(datas)) is s.text
            if s.sees == RESCUED:
                assert text_of(datas) == b.text
                assert len(b.requests) == 1
    else:
        body = orjson.loads(await resp.read())
        assert body["choices"][0]["message"]["content"] == b.text
    breaker = client.app[PROVIDERS]["openai"].breaker
    assert breaker.state.value == s.breaker
    await asyncio.sleep(0)  # the request's metrics are recorded as its handler returns
    assert metric(*s.metric) - before == 1


async def test_flapping_provider_loses_nothing(gateway, upstreams):
    """Up and down every few hundred ms under steady traffic: every request is answered."""
    a, b = await upstreams("a"), await upstreams("b")
    client = await gateway(a, b, probes=True, probe_interval=0.05, fail_max=2, reset_timeout=0.2)
    port = a.port
    opened_key = {"provider": "openai", "from_state": "closed", "to_state": "open"}
    opened_before = metric("gateway_breaker_transitions_total", opened_key)
    answered: dict[str, int] = {}

    async def traffic():
        for i in range(120):
            resp = await client.post("/v1/chat/completions", json=chat(stream=i % 2 == 0))
            assert resp.status == 200
            if i % 2:
                assert (await resp.json())["choices"][0]["message"]["content"]
            else:
                datas, done = await read_stream(resp)
                assert done and text_of(datas)
            answered[resp.headers["x-gateway-provider"]] = (
                answered.get(resp.headers["x-gateway-provider"], 0) + 1
            )
            await asyncio.sleep(0.01)

    async def flap():
        for _ in range(4):
            await asyncio.sleep(0.3)
            await a.stop()
            await asyncio.sleep(0.3)
            await a.start(port=port)

    await asyncio.gather(traffic(), flap())
    assert sum(answered.values()) == 120
    assert answered.get("openai") and answered.get("lmstudio")
    assert metric("gateway_breaker_transitions_total", opened_key) > opened_before


def render_table() -> str:
    """The README's failure-behaviour table."""
    rows = [
        "| fault on the primary | stream | client sees | answered by | attempts | primary's breaker |",
        "|---|---|---|---|---|---|",
    ]
    for s in SCENARIOS:
        sees = s.sees if s.status == 200 else f"{s.sees} ({s.status})"
        rows.append(
            f"| {s.name} | {'yes' if s.stream else 'no'} | {sees} | {s.provider} | {s.attempts} | {s.breaker} |"
        )
    return "\n".join(rows) + "\n"


def test_readme_table_matches_the_scenarios():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert render_table() in readme, (
        "README is stale: paste `python -m tests.test_conformance` into it"
    )


if __name__ == "__main__":
    print(render_table(), end="")
