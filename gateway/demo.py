"""Simulated OpenAI-compatible upstreams for ``python -m gateway --demo``.

Two servers on loopback ports: a "flaky" one that answers every other request with a 429
rate-limit error (``Retry-After: 5``), and a "steady" one that always answers, in a stream
when asked. Routing OpenAI to the first and LM Studio to the second shows failover with no
keys and no real model. Both serve every endpoint the gateway forwards: chat completions,
legacy completions and embeddings (a fixed vector per input, derived from its text).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

DEMO_MODEL = "demo-model"
#: Settings the demo uses unless the environment sets them: its gateway listens on
#: loopback only (``--host`` or ``GATEWAY_HOST`` still choose another address).
DEMO_DEFAULTS = {"GATEWAY_HOST": "127.0.0.1"}
_TEXT = "Hello from the steady upstream: the flaky one was rate limited."
_WORDS = _TEXT.split(" ")
_EMBEDDING_SIZE = 16

Handler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def _error(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _chat_chunk(content: str | None, finish: str | None, created: int) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {
        "id": "chatcmpl-demo",
        "object": "chat.completion.chunk",
        "created": created,
        "model": DEMO_MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _text_chunk(text: str, finish: str | None, created: int) -> dict[str, Any]:
    return {
        "id": "cmpl-demo",
        "object": "text_completion",
        "created": created,
        "model": DEMO_MODEL,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


async def _stream(
    request: web.Request, chunk: Callable[[str | None, str | None, int], dict[str, Any]]
) -> web.StreamResponse:
    """The answer word by word, then a finish_reason and ``[DONE]``."""
    created = int(time.time())
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    try:
        for i, word in enumerate(_WORDS):
            event = chunk(word if i == 0 else " " + word, None, created)
            await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
            await asyncio.sleep(0.02)
        await resp.write(b"data: " + orjson.dumps(chunk(None, "stop", created)) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
    except ConnectionResetError:
        pass  # the gateway's client went away and the gateway hung up on us
    return resp


async def _chat(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    if body.get("stream"):
        return await _stream(request, _chat_chunk)
    return _json(
        {
            "id": "chatcmpl-demo",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": DEMO_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": _TEXT},
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(5, len(_WORDS)),
        }
    )


async def _completions(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    if body.get("stream"):
        return await _stream(
            request, lambda text, finish, created: _text_chunk(text or "", finish, created)
        )
    answer = _text_chunk(_TEXT, "stop", int(time.time()))
    answer["usage"] = _usage(5, len(_WORDS))
    return _json(answer)


def _vector(item: Any) -> list[float]:
    """A unit-length vector that depends only on ``item``: same text, same embedding."""
    digest = hashlib.sha256(orjson.dumps(item)).digest()
    raw = [b / 127.5 - 1.0 for b in digest[:_EMBEDDING_SIZE]]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [round(x / norm, 6) for x in raw]


async def _embeddings(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    given = body.get("input")
    # One string, or one list of token ids, is one input; any other list is one per item.
    if isinstance(given, list) and given and not all(isinstance(t, int) for t in given):
        items = given
    else:
        items = [given]
    data = [
        {"object": "embedding", "index": i, "embedding": _vector(item)}
        for i, item in enumerate(items)
    ]
    tokens = sum(len(item.split()) if isinstance(item, str) else 1 for item in items)
    return _json(
        {
            "object": "list",
            "data": data,
            "model": DEMO_MODEL,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def simulated_upstream(flaky: bool) -> web.Application:
    """An upstream app; ``flaky`` makes every other request (any endpoint) a 429."""
    state = {"n": 0}

    async def models(request: web.Request) -> web.Response:
        data = {
            "object": "list",
            "data": [{"id": DEMO_MODEL, "object": "model", "owned_by": "demo"}],
        }
        return _json(data)

    def endpoint(answer: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                body = None
            if not isinstance(body, dict):
                return _json(
                    _error("The body is not a JSON object.", "invalid_request_error", None),
                    status=400,
                )
            state["n"] += 1
            if flaky and state["n"] % 2 == 1:
                error = _error(
                    f"Rate limit reached for {DEMO_MODEL} (simulated).",
                    "requests",
                    "rate_limit_exceeded",
                )
                return _json(error, status=429, headers={"Retry-After": "5"})
            return await answer(request, body)

        return handler

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", endpoint(_chat))
    app.router.add_post("/v1/completions", endpoint(_completions))
    app.router.add_post("/v1/embeddings", endpoint(_embeddings))
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
