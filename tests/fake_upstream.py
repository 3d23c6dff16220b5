"""A scriptable fake OpenAI-compatible provider: a real aiohttp server on 127.0.0.1.

Each request takes the next behaviour from ``script`` (or ``default`` when it is empty)
and answers like the real APIs do: OpenAI error bodies, SSE chunks, ``Retry-After``,
dropped connections, slow first tokens. Streams come in every shape real servers send
(:data:`SHAPES`): the finish reason on the last content chunk, empty answers, output in
fields other than ``content``, ``n > 1`` with a choice cut short, ``"error": null``, odd
media-type case, the body's end in a later read than ``[DONE]``, legacy completions. The
server counts TCP connections and the most requests it answered at once (``peak``),
records the bytes of every stream it sent, and notices when the gateway hangs up on it.
With :attr:`FakeUpstream.rpm` set it enforces a rate limit of its own, as OpenAI does
(smoothly: one second's worth at a time), and answers 429 ``rate_limit_exceeded`` past it.
"""

from __future__ import annotations

import asyncio
import functools
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

WORDS = ["Hello", " from", " the", " fake", " upstream", "."]


@dataclass
class Behaviour:
    """How to answer one request; build them with the helpers below."""

    kind: str = "ok"
    status: int = 200
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    tokens: int = len(WORDS)  # content chunks to send (streams)
    delay: float = 0.0  # before the first token
    role_chunk: bool = True  # send a role-only delta first
    done: bool = True  # send data: [DONE]
    finish: bool = True  # send a finish_reason chunk
    chunk_delay: float = 0.0
    raw: bytes = b""  # for kind "raw_sse": bytes written after the held events
    big: int = 0  # size of one extra content chunk sent first (a huge single event)
    # Shapes (streams unless said otherwise):
    finish_on_last: bool = False  # finish_reason on the last content chunk, not its own
    field: str = "content"  # the delta field that carries the output (see OUTPUT_FIELDS)
    n: int = 1  # choices per chunk
    cut_choice: int | None = None  # this choice never gets a finish_reason
    error_null: bool = False  # '"error": null' in every chunk and body
    content_type: str = "text/event-stream"
    end_delay: float = 0.0  # seconds between [DONE] and the end of the body (a later read)
    gate: asyncio.Event | None = None  # answer only once the test sets it
    midway: asyncio.Event | None = None  # streams: after the first content chunk, wait for it
    usage: dict[str, Any] | None = None  # replaces the usage block of a plain answer
    location: str = ""  # for kind "redirect"
    repeat_names: bool = False  # kind "tool": every delta repeats its id and name (llama.cpp)
    words: tuple[str, ...] = ()  # the content pieces, cycled (default: WORDS)
    args: tuple[str, ...] = ()  # kind "tool": the argument pieces (default: TOOL_ARGS)
    cut_after: int | None = None  # kind "tool": drop the connection after this many pieces


def ok(**kw: Any) -> Behaviour:
    """A normal answer (streamed when the request asks for a stream)."""
    return Behaviour("ok", **kw)


def openai_error(
    status: int,
    message: str,
    type_: str,
    code: str | None,
    param: str | None = None,
    retry_after: float | None = None,
) -> Behaviour:
    """An error response with OpenAI's body shape."""
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Behaviour("error", status=status, body=body, headers=headers)


def rate_limited(retry_after: float | None = None) -> Behaviour:
    """429 rate_limit_exceeded, as OpenAI sends it."""
    return openai_error(
        429,
        "Rate limit reached for gpt-4o-mini in organization org-test on requests per min "
        "(RPM): Limit 3, Used 3, Requested 1. Please try again in 20s.",
        "requests",
        "rate_limit_exceeded",
        retry_after=retry_after,
    )


def insufficient_quota() -> Behaviour:
    """429 insufficient_quota: the account is out of credit."""
    return openai_error(
        429,
        "You exceeded your current quota, please check your plan and billing details.",
        "insufficient_quota",
        "insufficient_quota",
    )


def server_error(status: int = 500) -> Behaviour:
    """A 5xx with OpenAI's server_error body."""
    return openai_error(
        status,
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    )


def bad_request(
    code: str | None = None, message: str = "Invalid value for 'temperature'."
) -> Behaviour:
    """A 400 invalid_request_error."""
    return openai_error(400, message, "invalid_request_error", code, "temperature")


def context_too_long() -> Behaviour:
    """400 context_length_exceeded."""
    return openai_error(
        400,
        "This model's maximum context length is 8192 tokens. However, your messages "
        "resulted in 9000 tokens. Please reduce the length of the messages.",
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    )


def content_refused() -> Behaviour:
    """400 content_policy_violation."""
    return openai_error(
        400,
        "Your request was rejected as a result of our safety system.",
        "invalid_request_error",
        "content_policy_violation",
    )


#: The tool call every fake makes for kind "tool": get_weather({"city": "Paris"}), its
#: arguments streamed in these pieces.
TOOL_NAME = "get_weather"
TOOL_ARGS = ('{"city": ', '"Paris"}')


def tool(**kw: Any) -> Behaviour:
    """The model calls :data:`TOOL_NAME` (streamed when the request asks for a stream)."""
    return Behaviour("tool", **kw)


def stream(**kw: Any) -> Behaviour:
    """A stream with options (tokens, delay, role_chunk, done, finish, chunk_delay)."""
    return Behaviour("ok", **kw)


def drop_after(tokens: int, role_chunk: bool = True) -> Behaviour:
    """A 200 stream that loses its connection after ``tokens`` content chunks."""
    return Behaviour("drop", tokens=tokens, role_chunk=role_chunk)


def stall_after(tokens: int) -> Behaviour:
    """A 200 stream that goes silent after ``tokens`` content chunks."""
    return Behaviour("stall", tokens=tokens)


def silent() -> Behaviour:
    """Accepts the request and never answers."""
    return Behaviour("silent")


def hang_up(after: float = 0.0) -> Behaviour:
    """Reads the request, then closes the connection (after ``after`` seconds of silence)
    without sending any response byte."""
    return Behaviour("hang_up", delay=after)


def empty(**kw: Any) -> Behaviour:
    """An empty answer: a role chunk, then a chunk with only ``finish_reason``."""
    return Behaviour("ok", tokens=0, **kw)


def one_chunk(**kw: Any) -> Behaviour:
    """The whole answer in one chunk that carries ``finish_reason`` too."""
    return Behaviour("ok", tokens=1, finish_on_last=True, role_chunk=False, **kw)


#: Delta fields that carry model output, and a piece of output in each.
OUTPUT_FIELDS: dict[str, Any] = {
    "content": "Hi",
    "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"}}],
    "function_call": {"name": "get_weather", "arguments": "{}"},
    "refusal": "I can't help with that.",
    "reasoning_content": "Thinking about it",
    "reasoning": "Thinking about it",  # Ollama's /v1 streams thinking here
    "audio": {"id": "audio_1", "transcript": "Hi"},
    "brand_new_field": {"anything": 1},  # fields not invented yet count too
}  # fmt: skip


def sse(raw: bytes, role_chunk: bool = True) -> Behaviour:
    """A 200 stream that sends a role chunk, then ``raw`` verbatim, then ends."""
    return Behaviour("raw_sse", raw=raw, role_chunk=role_chunk)


# -- hostile upstreams -------------------------------------------------------------------


def endless(status: int = 200, content_type: str = "application/json") -> Behaviour:
    """A body that never ends: 64 KiB pieces for as long as the gateway reads (at most 4 GiB
    or 60 s, so a test that fails does not run forever)."""
    return Behaviour("endless", status=status, headers={"Content-Type": content_type})


def bomb(inflated: int = 512 << 20, status: int = 200) -> Behaviour:
    """A gzip body of about 0.5 MB on the wire that inflates to ``inflated`` bytes."""
    return Behaviour("bomb", status=status, big=inflated)


def error_page(size: int, status: int = 502) -> Behaviour:
    """A big HTML error page, as a misconfigured proxy sends."""
    return Behaviour("page", status=status, big=size)


def redirect(status: int, location: str) -> Behaviour:
    """A redirect to ``location`` (another host, say)."""
    return Behaviour("redirect", status=status, location=location)


def echo_key(status: int = 401) -> Behaviour:
    """An error that quotes the request's ``Authorization`` header back, as some servers do."""
    return Behaviour("echo_key", status=status)


def echo_key_event() -> Behaviour:
    """A stream that quotes the ``Authorization`` header in an error event after two tokens."""
    return Behaviour("echo_key_event", tokens=2)


@functools.cache
def _gzip_zeros(size: int) -> bytes:
    gz = zlib.compressobj(1, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    out = [gz.compress(block) for _ in range(size >> 20)]
    return b"".join(out) + gz.flush()


def wrong_length() -> Behaviour:
    """A 200 whose Content-Length promises more than is sent before the connection closes."""
    return Behaviour("wrong_length")


def chunk(
    content: Any = None,
    finish: str | None = None,
    role: bool = False,
    *,
    field: str = "content",
    indexes: tuple[int, ...] = (0,),
    legacy: bool = False,
    error_null: bool = False,
    ident: dict[str, Any] | None = None,
) -> bytes:
    """One chat.completion.chunk event as OpenAI frames it (``legacy``: a text_completion
    chunk), with a choice for each of ``indexes``; ``content`` goes in delta ``field``;
    ``ident`` replaces its ``id``, ``model`` or ``created``."""
    choices = []
    for index in indexes:
        if legacy:
            text = content if isinstance(content, str) else ""
            choices.append({"index": index, "text": text, "logprobs": None,
                            "finish_reason": finish})  # fmt: skip
            continue
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
            delta["content"] = ""
        if content is not None:
            delta[field] = content
        choices.append({"index": index, "delta": delta, "logprobs": None, "finish_reason": finish})
    body: dict[str, Any] = {
        "id": "cmpl-fake" if legacy else "chatcmpl-fake",
        "object": "text_completion" if legacy else "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
        "system_fingerprint": "fp_fake",
        "choices": choices,
    }
    if error_null:
        body["error"] = None
    if ident:
        body.update(ident)
    return b"data: " + orjson.dumps(body) + b"\n\n"


def completion(text: str, model: str, legacy: bool = False) -> dict[str, Any]:
    """A chat.completion body (``legacy``: a text_completion body)."""
    if legacy:
        return {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": 1700000000,
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15},
        }
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15},
    }


class FakeUpstream:
    """One fake provider. ``async with FakeUpstream("openai") as up: up.url ...``."""

    def __init__(self, name: str = "fake", models: tuple[str, ...] = ("local-model",)) -> None:
        self.name = name
        self.models = list(models)
        self.script: deque[Behaviour] = deque()
        self.default = ok()
        self.requests: list[dict[str, Any]] = []  # bodies of chat/completions/embeddings
        self.headers: list[dict[str, str]] = []
        self.probes = 0
        self.probe_headers: list[dict[str, str]] = []
        self.active = 0  # requests being answered now
        self.peak = 0  # the most requests it was answering at once
        self.connections = 0
        self.disconnects = 0  # requests the client abandoned before the response ended
        self.models_status = 200
        self.models_delay = 0.0  # seconds before answering /v1/models
        self.models_location = ""  # when set, /v1/models redirects there
        self.sent: list[bytes] = []  # every stream's body, as written
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self.port = 0
        self.text = "".join(WORDS)
        # Its streams' chunk id, model and created, when set (e.g. {"id": "chatcmpl-b"}).
        self.ident: dict[str, Any] | None = None
        # A chat request whose last message is the assistant's (a prefill): "reject" it
        # with a 400 about the last message, as Mistral does; "continue" the answer from
        # there, as Anthropic and llama.cpp do; None: answer as usual.
        self.prefill: str | None = None
        # Its own rate limit (0: none): rpm / 60 requests a second, one second's worth (at
        # least 1) at a time; a request past it gets 429 and is counted in ``refused``.
        self.rpm = 0.0
        self.refused = 0
        self._allowance: float | None = None
        self._allowance_at = 0.0

    @property
    def url(self) -> str:
        """Base URL, with /v1."""
        return f"http://127.0.0.1:{self.port}/v1"

    def then(self, *behaviours: Behaviour) -> FakeUpstream:
        """Queue behaviours for the next requests."""
        self.script.extend(behaviours)
        return self

    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1 (on ``port``, or a free one)."""
        app = web.Application()
        self._routes(app)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        server = self._runner.server
        assert server is not None

        def factory() -> Any:
            self.connections += 1
            return server()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(factory, "127.0.0.1", port or self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def _routes(self, app: web.Application) -> None:
        """The API it serves (the vendor fakes of tests/fake_vendors.py serve theirs)."""
        app.router.add_get("/v1/models", self._models)
        for path in ("chat/completions", "completions", "embeddings"):
            app.router.add_post(f"/v1/{path}", self._handle)

    async def stop(self) -> None:
        """Stop listening and drop open connections (the port then refuses)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _models(self, request: web.Request) -> web.Response:
        self.probes += 1
        self.probe_headers.append(dict(request.headers))
        if self.models_delay:
            await asyncio.sleep(self.models_delay)
        if self.models_location:
            raise web.HTTPFound(self.models_location)
        if self.models_status != 200:
            return web.Response(status=self.models_status, body=b'{"error": "down"}')
        return web.Response(
            body=orjson.dumps(self._model_list(request)), content_type="application/json"
        )

    def _model_list(self, request: web.Request) -> dict[str, Any]:
        """The body of a good model list (a vendor fake answers in its API's shape)."""
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": self.name} for m in self.models
        ]
        return {"object": "list", "data": data}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            return await self._handle_counted(request)
        finally:
            self.active -= 1

    async def _handle_counted(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.rpm and not self._within_rpm():
            self.refused += 1
            return await self._answer(request, body, rate_limited())
        b = self.script.popleft() if self.script else self.default
        if self.prefill == "reject" and _prefilled(body) is not None:
            b = openai_error(
                400,
                "Expected last role User or Tool (or Assistant with prefix True) for "
                "serving but got assistant",
                "invalid_request_error",
                None,
                "messages",
            )
        try:
            return await self._answer(request, body, b)
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            raise

    async def _answer(
        self, request: web.Request, body: dict[str, Any], b: Behaviour
    ) -> web.StreamResponse:
        if b.gate is not None:
            async with asyncio.timeout(30):  # bounded: a test that forgets the gate fails
                await b.gate.wait()
        if b.kind == "silent":
            await asyncio.sleep(3600)
        if b.kind == "hang_up":
            if b.delay:
                await asyncio.sleep(b.delay)
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(3600)
        if b.kind == "error":
            return web.Response(
                status=b.status,
                body=orjson.dumps(b.body),
                content_type="application/json",
                headers=b.headers,
            )
        if b.kind in _HOSTILE:
            return await _HOSTILE[b.kind](request, b)
        if request.path.endswith("/embeddings"):
            data = {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
            }
            data["model"] = body["model"]
            return web.Response(body=orjson.dumps(data), content_type="application/json")
        if b.kind == "wrong_length":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = 1000
            await resp.prepare(request)
            await resp.write(orjson.dumps(completion(self.text, body["model"]))[:100])
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(3600)
        legacy = request.path.endswith("/completions") and "chat" not in request.path
        if b.kind == "tool":
            return await self._tool(request, body, b)
        if not body.get("stream"):
            if b.delay:
                await asyncio.sleep(b.delay)
            answer = completion(self.text, body["model"], legacy=legacy)
            if b.error_null:
                answer["error"] = None
            if b.usage is not None:
                answer["usage"] = b.usage
            return web.Response(
                body=orjson.dumps(answer),
                content_type="application/json",
                headers={"x-ratelimit-remaining-requests": "99", **b.headers},
            )
        options = body.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        start = self._continued(body, b) if self.prefill == "continue" else 0
        return await self._stream(request, b, legacy, usage, start)

    def _continued(self, body: dict[str, Any], b: Behaviour) -> int:
        """How many content pieces a prefilled answer already has (0 without a prefill)."""
        partial = _prefilled(body)
        if not partial:
            return 0
        text = ""
        for i in range(b.tokens):
            text += self._piece(b, i)
            if text == partial:
                return i + 1
        raise AssertionError(f"the prefill is not a prefix of the answer: {partial!r}")

    async def _stream(
        self,
        request: web.Request,
        b: Behaviour,
        legacy: bool,
        usage: bool = False,
        start: int = 0,
    ) -> web.StreamResponse:
        """A stream (from content piece ``start`` on); with ``usage``
        (``stream_options.include_usage``) a usage-only chunk precedes ``[DONE]``, as
        OpenAI sends it."""
        resp = web.StreamResponse(headers={"Content-Type": b.content_type})
        await resp.prepare(request)
        sent = bytearray()
        self.sent.append(b"")

        async def write(data: bytes) -> None:
            sent.extend(data)
            self.sent[-1] = bytes(sent)
            await resp.write(data)

        indexes = tuple(range(b.n))
        live = tuple(i for i in indexes if i != b.cut_choice)
        shape = {"field": b.field, "legacy": legacy, "error_null": b.error_null}
        shape["ident"] = self.ident
        if b.role_chunk and not legacy:
            await write(
                chunk(role=True, indexes=indexes, error_null=b.error_null, ident=self.ident)
            )
        if b.kind == "raw_sse":
            await write(b.raw)
            return resp
        if b.delay:
            await asyncio.sleep(b.delay)
        if b.big:
            await write(chunk("x" * b.big, indexes=indexes, **shape))
        for i in range(start, b.tokens):
            last = i == b.tokens - 1
            piece = self._piece(b, i)
            if last and b.finish_on_last and b.finish:
                if live:
                    await write(chunk(piece, "stop", indexes=live, **shape))
                if b.cut_choice is not None:
                    await write(chunk(piece, indexes=(b.cut_choice,), **shape))
            else:
                await write(chunk(piece, indexes=indexes, **shape))
            if i == start and b.midway is not None:
                async with asyncio.timeout(30):  # bounded, like the gate
                    await b.midway.wait()
            if b.chunk_delay:
                await asyncio.sleep(b.chunk_delay)
        if b.kind == "drop":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(3600)
        if b.kind == "stall":
            await asyncio.sleep(3600)
        if b.finish and not (b.finish_on_last and b.tokens) and live:
            await write(chunk(finish="stop", indexes=live, **shape))
        if usage:
            last = orjson.loads(chunk(indexes=(), ident=self.ident)[6:])
            last["usage"] = completion("", "")["usage"]
            await write(b"data: " + orjson.dumps(last) + b"\n\n")
        if b.done:
            await write(b"data: [DONE]\n\n")
        if b.end_delay:
            await asyncio.sleep(b.end_delay)  # the chunked terminator comes in a later read
        return resp

    async def _tool(
        self, request: web.Request, body: dict[str, Any], b: Behaviour
    ) -> web.StreamResponse:
        """A tool call, as OpenAI sends it: the id, type and name in the first delta only
        (unless ``repeat_names``), then the arguments in pieces."""
        call = {"id": "call_1", "type": "function", "function": {"name": TOOL_NAME}}
        if not body.get("stream"):
            answer = completion("", body["model"])
            choice = answer["choices"][0]
            arguments = "".join(TOOL_ARGS)
            choice["message"] = {"role": "assistant", "content": None, "refusal": None,
                                 "tool_calls": [{**call, "function": {"name": TOOL_NAME, "arguments": arguments}}]}  # fmt: skip
            choice["finish_reason"] = "tool_calls"
            return web.Response(body=orjson.dumps(answer), content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        ident = self.ident
        parts = [chunk(role=True, ident=ident)]
        for i, piece in enumerate(("", *(b.args or TOOL_ARGS))):
            first = {"index": 0, **call} if i == 0 or b.repeat_names else {"index": 0}
            delta = [{**first, "function": {**first.get("function", {}), "arguments": piece}}]
            parts.append(chunk(delta, field="tool_calls", ident=ident))
        if b.cut_after is not None:  # the role chunk, then that many pieces
            del parts[b.cut_after + 1 :]
        else:
            parts += [chunk(finish="tool_calls", ident=ident), b"data: [DONE]\n\n"]
        self.sent.append(b"".join(parts))
        for part in parts:
            await resp.write(part)
        if b.cut_after is not None:
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(3600)
        return resp

    def _within_rpm(self) -> bool:
        """Take one request from the rate limit's bucket; False when it is empty."""
        rate = self.rpm / 60
        capacity = max(1.0, rate)
        now = time.monotonic()
        if self._allowance is None:
            self._allowance = capacity
        else:
            elapsed = now - self._allowance_at
            self._allowance = min(capacity, self._allowance + elapsed * rate)
        self._allowance_at = now
        if self._allowance < 1:
            return False
        self._allowance -= 1
        return True

    @staticmethod
    def _piece(b: Behaviour, i: int) -> Any:
        """The ``i``-th piece of output for delta ``b.field``."""
        if b.field == "content":
            words = b.words or WORDS
            return words[i % len(words)]
        return OUTPUT_FIELDS[b.field]


async def _endless(request: web.Request, b: Behaviour) -> web.StreamResponse:
    resp = web.StreamResponse(status=b.status, headers=b.headers)
    await resp.prepare(request)
    piece = b"<p>" + b"x" * (64 * 1024 - 7) + b"</p>"
    end = time.monotonic() + 60
    for _ in range(65536):  # 4 GiB at most
        if time.monotonic() > end:
            break
        await resp.write(piece)
    return resp


async def _bomb(request: web.Request, b: Behaviour) -> web.StreamResponse:
    body = _gzip_zeros(b.big)
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    return web.Response(status=b.status, body=body, headers=headers)


async def _page(request: web.Request, b: Behaviour) -> web.StreamResponse:
    body = b"<html><body>" + b"Bad gateway. " * (b.big // 13) + b"</body></html>"
    return web.Response(status=b.status, body=body, content_type="text/html")


async def _redirect(request: web.Request, b: Behaviour) -> web.StreamResponse:
    return web.Response(status=b.status, headers={"Location": b.location})


def _quoted_key(request: web.Request) -> str:
    return f"Invalid header 'Authorization: {request.headers.get('Authorization', '')}'"


async def _echo_key(request: web.Request, b: Behaviour) -> web.StreamResponse:
    error = {
        "message": _quoted_key(request),
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    return web.Response(
        status=b.status, body=orjson.dumps({"error": error}), content_type="application/json"
    )


async def _echo_key_event(request: web.Request, b: Behaviour) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(chunk(WORDS[0]) + chunk(WORDS[1]))
    error = {"message": _quoted_key(request), "type": "server_error", "code": None}
    await resp.write(b"data: " + orjson.dumps({"error": error}) + b"\n\n")
    return resp


def _prefilled(body: dict[str, Any]) -> str | None:
    """The partial answer a chat request prefills (its last message the assistant's)."""
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        last = messages[-1]
        if last.get("role") == "assistant" and isinstance(last.get("content"), str):
            return last["content"]
    return None


_HOSTILE = {
    "endless": _endless,
    "bomb": _bomb,
    "page": _page,
    "redirect": _redirect,
    "echo_key": _echo_key,
    "echo_key_event": _echo_key_event,
}


def wait_until(cond: Any, timeout: float = 5.0) -> Any:
    """Poll ``cond()`` until true (bounded); returns an awaitable."""

    async def _wait() -> None:
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                raise AssertionError("condition not met in time")
            await asyncio.sleep(0.01)

    return _wait()
