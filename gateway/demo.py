"""Simulated OpenAI-compatible upstreams for ``python -m gateway --demo``.

Two servers on loopback ports: a "flaky" one that answers every other chat request with
a 429 rate-limit error (``Retry-After: 5``), and a "steady" one that always answers, in
a stream when asked. Routing OpenAI to the first and LM Studio to the second shows
failover with no keys and no real model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import orjson
from aiohttp import web

DEMO_MODEL = "demo-model"
#: Settings the demo uses unless the environment sets them: its gateway listens on
#: loopback only (``--host`` or ``GATEWAY_HOST`` still choose another address).
DEMO_DEFAULTS = {"GATEWAY_HOST": "127.0.0.1"}
_WORDS = "Hello from the steady upstream: the flaky one was rate limited.".split(" ")


def _chunk(content: str | None, finish: str | None, created: int) -> bytes:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    body = {
        "id": "chatcmpl-demo",
        "object": "chat.completion.chunk",
        "created": created,
        "model": DEMO_MODEL,
        "choices": [choice],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


def simulated_upstream(flaky: bool) -> web.Application:
    """An upstream app; ``flaky`` makes every other chat request a 429."""
    state = {"n": 0}

    async def models(request: web.Request) -> web.Response:
        data = {
            "object": "list",
            "data": [{"id": DEMO_MODEL, "object": "model", "owned_by": "demo"}],
        }
        return web.json_response(data, dumps=lambda o: orjson.dumps(o).decode())

    async def chat(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        state["n"] += 1
        if flaky and state["n"] % 2 == 1:
            error = {
                "error": {
                    "message": "Rate limit reached for demo-model (simulated).",
                    "type": "requests",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            }
            return web.Response(
                status=429,
                body=orjson.dumps(error),
                content_type="application/json",
                headers={"Retry-After": "5"},
            )
        created = int(time.time())
        text = " ".join(_WORDS)
        if not body.get("stream"):
            answer = {
                "id": "chatcmpl-demo",
                "object": "chat.completion",
                "created": created,
                "model": DEMO_MODEL,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": 5,
                    "completion_tokens": len(_WORDS),
                    "total_tokens": 5 + len(_WORDS),
                },
            }
            return web.Response(body=orjson.dumps(answer), content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i, word in enumerate(_WORDS):
                await resp.write(_chunk(word if i == 0 else " " + word, None, created))
                await asyncio.sleep(0.02)
            await resp.write(_chunk(None, "stop", created))
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            pass  # the gateway's client went away and the gateway hung up on us
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def start_demo_upstreams() -> tuple[dict[str, str], list[web.AppRunner]]:
    """Start both upstreams; return the environment that routes to them, and their runners."""
    runners = []
    urls = []
    for flaky in (True, False):
        runner = web.AppRunner(simulated_upstream(flaky), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        urls.append(f"http://127.0.0.1:{port}/v1")
        runners.append(runner)
    env: Mapping[str, str] = {
        "OPENAI_BASE_URL": urls[0],
        "OPENAI_API_KEY": "demo-key",
        "LMSTUDIO_BASE_URL": urls[1],
        "LMSTUDIO_MODEL": DEMO_MODEL,
        "OLLAMA_BASE_URL": "",
        "FAILOVER_ORDER": "openai,lmstudio",
    }
    return dict(env), runners
