"""Fakes of vendor APIs that are not OpenAI's, built from their documented wire formats.

They extend :class:`tests.fake_upstream.FakeUpstream` (real aiohttp servers on 127.0.0.1,
scripted with the same :class:`~tests.fake_upstream.Behaviour`\\ s: ``error``, ``silent``,
``hang_up`` work as there) and answer the kinds ``ok`` (the text of
:data:`~tests.fake_upstream.WORDS`), ``tool`` (``get_weather({"city": "Paris"})``),
``stream_error`` (``tokens`` words, then the vendor's in-stream error ``body``) and
``drop`` (``tokens`` words, then the connection is lost) in their own API's shapes:

* :class:`FakeAnthropic`: the Messages API. ``POST /v1/messages`` wants ``x-api-key`` and
  ``anthropic-version`` (else 401 ``authentication_error``); a message object, or named
  SSE events ``message_start``, ``content_block_start``, ``ping``, ``content_block_delta``
  (``text_delta``, ``input_json_delta``), ``content_block_stop``, ``message_delta``
  (``stop_reason``, cumulative ``usage``), ``message_stop``, ``error``; errors are
  ``{"type": "error", "error": {"type", "message"}, "request_id"}``; ``GET /v1/models``
  pages ``{"data": [{"type": "model", "id", ...}], "has_more", "first_id", "last_id"}``.
* :class:`FakeOllama`: the native API. ``POST /api/chat`` streams NDJSON
  (``application/x-ndjson``) unless ``"stream": false``: ``{"model", "created_at",
  "message": {"role", "content", "tool_calls"}, "done": false}`` lines, then the ``done``
  line with ``done_reason``, ``prompt_eval_count`` and ``eval_count``; an unknown model is
  404 ``{"error": "model \\"x\\" not found, try pulling it first"}``; ``GET /api/tags``
  lists the pulled models, ``GET /api/ps`` those in memory.
* :class:`FakeAzure`: Azure OpenAI. ``POST /openai/deployments/{deployment}/{endpoint}
  ?api-version=...`` with the ``api-key`` header (else 401), 404 ``DeploymentNotFound``
  for an unknown deployment, 404 without ``api-version``; bodies and streams are
  OpenAI's (the base fake's); ``GET /openai/models?api-version=...``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from tests.conftest import PROVIDER_KEY
from tests.fake_upstream import TOOL_ARGS, TOOL_NAME, WORDS, Behaviour, FakeUpstream

#: Token counts every vendor fake reports: the same as the OpenAI fake's usage.
PROMPT_TOKENS = 9


def _words(n: int) -> list[str]:
    return [WORDS[i % len(WORDS)] for i in range(n)]


def stream_error(tokens: int, body: dict[str, Any]) -> Behaviour:
    """``tokens`` words, then the vendor's in-stream error ``body``."""
    return Behaviour("stream_error", tokens=tokens, body=body)


# -- Anthropic ---------------------------------------------------------------------------


def anthropic_body(kind: str, message: str) -> dict[str, Any]:
    """Anthropic's error body."""
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_1"}


def anthropic_error(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None
) -> Behaviour:
    """An HTTP error as Anthropic sends it."""
    return Behaviour(
        "error", status=status, body=anthropic_body(kind, message), headers=headers or {}
    )


class FakeAnthropic(FakeUpstream):
    """Anthropic's Messages API."""

    def __init__(
        self, name: str = "anthropic", models: tuple[str, ...] = ("claude-sonnet-4-5-20250929",)
    ) -> None:
        super().__init__(name, models)
        self.key = PROVIDER_KEY

    def _routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/messages", self._handle)

    def _model_list(self, request: web.Request) -> dict[str, Any]:
        data = [
            {"type": "model", "id": m, "display_name": m, "created_at": "2025-09-29T00:00:00Z"}
            for m in self.models
        ]
        return {
            "data": data,
            "has_more": False,
            "first_id": self.models[0],
            "last_id": self.models[-1],
        }

    async def _models(self, request: web.Request) -> web.Response:
        if request.headers.get("x-api-key") != self.key:
            self.probes += 1
            return web.json_response(
                anthropic_body("authentication_error", "invalid x-api-key"), status=401
            )
        return await super()._models(request)

    async def _answer(
        self, request: web.Request, body: dict[str, Any], b: Behaviour
    ) -> web.StreamResponse:
        if (
            request.headers.get("x-api-key") != self.key
            or "anthropic-version" not in request.headers
        ):
            return web.json_response(
                anthropic_body("authentication_error", "invalid x-api-key"), status=401
            )
        if b.kind not in ("ok", "tool", "stream_error", "drop"):
            return await super()._answer(request, body, b)
        if b.delay:
            await asyncio.sleep(b.delay)
        if not body.get("stream"):
            return web.json_response(self._message(body, b), headers=b.headers)
        return await self._events(request, body, b)

    def _message(self, body: dict[str, Any], b: Behaviour) -> dict[str, Any]:
        words = _words(b.tokens)
        content: list[dict[str, Any]] = [{"type": "text", "text": "".join(words)}]
        stop = "end_turn"
        if b.kind == "tool":
            content = [{"type": "text", "text": "Let me check."},
                       {"type": "tool_use", "id": "toolu_1", "name": TOOL_NAME, "input": orjson.loads("".join(TOOL_ARGS))}]  # fmt: skip
            stop = "tool_use"
        return {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                "content": content, "stop_reason": stop, "stop_sequence": None,
                "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": len(words)}}  # fmt: skip

    async def _events(
        self, request: web.Request, body: dict[str, Any], b: Behaviour
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", **b.headers}
        )
        await resp.prepare(request)
        self.sent.append(b"")

        async def send(kind: str, data: dict[str, Any]) -> None:
            raw = f"event: {kind}\ndata: ".encode() + orjson.dumps({"type": kind, **data}) + b"\n\n"
            self.sent[-1] += raw
            await resp.write(raw)
            if b.chunk_delay:
                await asyncio.sleep(b.chunk_delay)

        message = {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": body["model"],
                   "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": 1}}  # fmt: skip
        await send("message_start", {"message": message})
        await send(
            "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}
        )
        await send("ping", {})
        words = ["Let me", " check."] if b.kind == "tool" else _words(b.tokens)
        for word in words:
            await send(
                "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": word}}
            )
        if b.kind == "stream_error":
            await send("error", b.body or {})
            return resp
        if b.kind == "drop":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(3600)
        await send("content_block_stop", {"index": 0})
        stop = "end_turn"
        if b.kind == "tool":
            block = {"type": "tool_use", "id": "toolu_1", "name": TOOL_NAME, "input": {}}
            await send("content_block_start", {"index": 1, "content_block": block})
            for piece in ("", *TOOL_ARGS):
                await send(
                    "content_block_delta",
                    {"index": 1, "delta": {"type": "input_json_delta", "partial_json": piece}},
                )
            await send("content_block_stop", {"index": 1})
            stop = "tool_use"
        usage = {"output_tokens": len(words)}
        await send(
            "message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None}, "usage": usage}
        )
        await send("message_stop", {})
        return resp


# -- Ollama ------------------------------------------------------------------------------


def ollama_error(status: int, message: str) -> Behaviour:
    """An HTTP error as Ollama sends it: ``{"error": "message"}``."""
    return Behaviour("error", status=status, body={"error": message})


class FakeOllama(FakeUpstream):
    """Ollama's native API (its ``/v1`` is off)."""

    def __init__(
        self, name: str = "ollama", models: tuple[str, ...] = ("llama3.2:latest",)
    ) -> None:
        super().__init__(name, models)
        self.running = list(models)  # what /api/ps lists

    def _routes(self, app: web.Application) -> None:
        app.router.add_get("/api/tags", self._models)
        app.router.add_get("/api/ps", self._ps)
        app.router.add_post("/api/chat", self._handle)

    @staticmethod
    def _entry(name: str) -> dict[str, Any]:
        details = {
            "format": "gguf",
            "family": "llama",
            "parameter_size": "3.2B",
            "quantization_level": "Q4_K_M",
        }
        return {"name": name, "model": name, "modified_at": "2025-01-01T00:00:00Z", "size": 2019393189,
                "digest": "a80c4f17acd5", "details": details}  # fmt: skip

    def _model_list(self, request: web.Request) -> dict[str, Any]:
        return {"models": [self._entry(m) for m in self.models]}

    async def _ps(self, request: web.Request) -> web.Response:
        models = [
            {**self._entry(m), "expires_at": "2030-01-01T00:00:00Z", "size_vram": 2019393189}
            for m in self.running
        ]
        return web.json_response({"models": models})

    def _known(self, model: str) -> bool:
        return model in self.models or f"{model}:latest" in self.models

    async def _answer(
        self, request: web.Request, body: dict[str, Any], b: Behaviour
    ) -> web.StreamResponse:
        if b.kind not in ("ok", "tool", "stream_error", "drop"):
            return await super()._answer(request, body, b)
        model = body["model"]
        if not self._known(model):
            return web.json_response(
                {"error": f'model "{model}" not found, try pulling it first'}, status=404
            )
        if b.delay:
            await asyncio.sleep(b.delay)
        if body.get("stream", True) is False:
            content = "".join(_words(b.tokens)) if b.kind != "tool" else ""
            line = self._line(model, content, done=True, tools=b.kind == "tool", count=b.tokens)
            return web.json_response(line)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        self.sent.append(b"")

        async def send(line: dict[str, Any]) -> None:
            raw = orjson.dumps(line) + b"\n"
            self.sent[-1] += raw
            await resp.write(raw)
            if b.chunk_delay:
                await asyncio.sleep(b.chunk_delay)

        words = [] if b.kind == "tool" else _words(b.tokens)
        for word in words:
            await send(self._line(model, word))
        if b.kind == "stream_error":
            await send(b.body or {})
            return resp
        if b.kind == "drop":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(3600)
        if b.kind == "tool":
            await send(self._line(model, "", tools=True))
        await send(self._line(model, "", done=True, count=len(words)))
        return resp

    @staticmethod
    def _line(
        model: str, content: str, *, done: bool = False, tools: bool = False, count: int = 0
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if tools:
            message["tool_calls"] = [
                {"function": {"name": TOOL_NAME, "arguments": orjson.loads("".join(TOOL_ARGS))}}
            ]
        line: dict[str, Any] = {
            "model": model,
            "created_at": "2025-01-01T00:00:00.000000Z",
            "message": message,
            "done": done,
        }
        if done:
            line.update(done_reason="stop", total_duration=5_000_000, load_duration=1_000_000,
                        prompt_eval_count=PROMPT_TOKENS, prompt_eval_duration=1_000_000,
                        eval_count=count, eval_duration=3_000_000)  # fmt: skip
        return line


# -- Azure OpenAI ------------------------------------------------------------------------


def azure_error(
    http: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> Behaviour:
    """An HTTP error as Azure OpenAI sends it (``extra``: more fields of its error object)."""
    body = {"error": {"code": code, "message": message, **extra}}
    return Behaviour("error", status=http, body=body, headers=headers or {})


def azure_content_filter(code_in_inner_only: bool = False) -> Behaviour:
    """400: the prompt tripped the content filter (``content_filter``, with the
    ``ResponsibleAIPolicyViolation`` inner error)."""
    severity = {"filtered": True, "severity": "high"}
    inner = {"code": "ResponsibleAIPolicyViolation",
             "content_filter_result": {"hate": severity, "self_harm": {"filtered": False, "severity": "safe"}}}  # fmt: skip
    return azure_error(
        400,
        "BadRequest" if code_in_inner_only else "content_filter",
        "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
        "Please modify your prompt and retry.",
        type=None,
        param="prompt",
        status=400,
        innererror=inner,
    )


class FakeAzure(FakeUpstream):
    """Azure OpenAI deployments: OpenAI's bodies at deployment URLs."""

    def __init__(
        self, name: str = "azure", deployments: tuple[str, ...] = ("gpt-4o-prod",)
    ) -> None:
        super().__init__(name, ("gpt-4o-2024-08-06",))
        self.deployments = set(deployments)
        self.key = PROVIDER_KEY
        self.urls: list[str] = []  # path and query of every deployment request

    def _routes(self, app: web.Application) -> None:
        app.router.add_get("/openai/models", self._models)
        app.router.add_post("/openai/deployments/{deployment}/{endpoint:.+}", self._deployment)

    async def _deployment(self, request: web.Request) -> web.StreamResponse:
        self.urls.append(str(request.rel_url))
        if "api-version" not in request.query:
            return web.json_response(
                {"error": {"code": "404", "message": "Resource not found"}}, status=404
            )
        if request.headers.get("api-key") != self.key:
            message = ("Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide "
                       "a valid key for an active subscription and use a correct regional API endpoint for your resource.")  # fmt: skip
            return web.json_response({"error": {"code": "401", "message": message}}, status=401)
        if request.match_info["deployment"] not in self.deployments:
            message = ("The API deployment for this resource does not exist. If you created the deployment "
                       "within the last 5 minutes, please wait a moment and try again.")  # fmt: skip
            return web.json_response(
                {"error": {"code": "DeploymentNotFound", "message": message}}, status=404
            )
        return await self._handle(request)
