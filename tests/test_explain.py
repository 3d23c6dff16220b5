"""Every 503 says why: the cause of an open breaker in the log, the answer and at start-up."""

from __future__ import annotations

import logging

import orjson

from breakers import State
from gateway.server import PROVIDERS
from tests.conftest import chat
from tests.fake_upstream import wait_until


async def test_a_dead_provider_is_explained_everywhere(gateway, upstreams, refused_url, caplog):
    caplog.set_level(logging.INFO, logger="gateway")
    port = refused_url.split(":")[2].split("/")[0]
    a = await upstreams("a")
    client = await gateway(refused_url, probes=True, probe_interval=0.05, reset_timeout=30)
    openai = client.app[PROVIDERS]["openai"]
    await wait_until(lambda: openai.breaker.state is State.OPEN)
    why = f"cannot connect to 127.0.0.1:{port}: Connection refused"

    # the log: once per state change, with what failed, where, and what happens now
    opened = [r.getMessage() for r in caplog.records if "-> open" in r.getMessage()]
    assert len(opened) == 1
    assert why in opened[0] and refused_url in opened[0] and "skip it for 30s" in opened[0]

    # the answer: the attempt list says why the breaker is open
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.status == 503
    message = orjson.loads(await resp.read())["error"]["message"]
    assert f"OpenAI: breaker_open (unreachable ({why}); retry in" in message

    # start-up: one line per provider after the first round of probes
    await wait_until(lambda: any("provider 1/1" in r.getMessage() for r in caplog.records))
    line = next(r for r in caplog.records if "provider 1/1" in r.getMessage())
    assert line.levelno == logging.WARNING
    assert line.getMessage().startswith(f"provider 1/1: OpenAI at {refused_url}")
    assert f"not usable: unreachable ({why})" in line.getMessage()
    assert a.requests == []


async def test_the_start_up_table_names_a_model_that_is_not_loaded(gateway, upstreams, caplog):
    caplog.set_level(logging.INFO, logger="gateway")
    a = await upstreams("a")
    b = await upstreams("b", models=("qwen3-8b",))
    await gateway(a, b, probes=True, probe_interval=0.05)
    await wait_until(lambda: any("provider 2/2" in r.getMessage() for r in caplog.records))
    lines = {
        r.getMessage().split(":")[0]: r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("provider ")
    }
    assert lines["provider 1/2"].endswith("model (the client's): usable")
    assert "model 'local-model' is not loaded (loaded: qwen3-8b)" in lines["provider 2/2"]
