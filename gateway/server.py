"""The aiohttp application: routes, middlewares, start-up and clean-up."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from gateway import metrics, rescue, status
from gateway.auth import CLIENT_KEY, SESSIONS, Sessions, auth_middleware
from gateway.cache import Backend, Cache, MemoryBackend
from gateway.cached import CachedAnswers
from gateway.call import Call, Reply
from gateway.config import Settings
from gateway.connections import parse_error_reason
from gateway.errors import GatewayError
from gateway.failover import run
from gateway.providers import DIALECTS
from gateway.quotas import Quotas
from gateway.redact import Redactor
from gateway.report import log_after_first_probes, provider_report
from gateway.request_log import RequestLog, finish
from gateway.respond import (
    SHUTDOWN_REASON,
    error_response,
    send_reply,
    shutdown_response,
    shutting_down,
)
from gateway.routing import Router
from gateway.sharing import GatewaySharing, Worker, share_providers
from gateway.stream import relay
from gateway.upstream import Provider

log = logging.getLogger("gateway")

SETTINGS = web.AppKey("settings", Settings)
PROVIDERS = web.AppKey("providers", dict[str, Provider])
ROUTER = web.AppKey("router", Router[Provider])
KNOWN_MODELS = web.AppKey("known_models", frozenset[str])
REQUEST_LOG = web.AppKey("request_log", RequestLog)
REQUEST_ID = web.RequestKey("request_id", str)
ACTIVE = web.AppKey("active", set[asyncio.Task[Any]])  # proxy handlers in progress
QUOTAS = web.AppKey("quotas", Quotas)  # per client key
CACHED = web.AppKey("cached", CachedAnswers)  # set when [cache] is enabled
SHARING = web.AppKey("sharing", GatewaySharing)  # set when provider state is shared

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# orjson reads up to 1024 levels but writes only 254: a body the gateway may have to
# re-encode (another model name upstream) must fit the smaller bound.
_MAX_DEPTH = 254
# What each endpoint's body must carry besides "model".
_REQUIRED = {"chat/completions": "messages", "completions": "prompt", "embeddings": "input"}


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response encoded with orjson."""
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def _request_id(request: web.Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.fullmatch(given) else os.urandom(16).hex()


def _own_headers(request_id: str) -> dict[str, str]:
    """The headers of an answer the gateway gives itself (bad input, GET endpoints): no
    provider was tried. Proxied answers set their own from the attempts."""
    return {
        "x-gateway-provider": "none",
        "x-gateway-attempts": "0",
        "x-gateway-failover": "false",
        "x-request-id": request_id,
    }


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves as OpenAI-style JSON with a request id; no traceback leaks."""
    request_id = _request_id(request)
    request[REQUEST_ID] = request_id
    own = _own_headers(request_id)
    try:
        resp = await handler(request)
    except GatewayError as e:
        return e.response(own)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = "not_found" if e.status == 404 else None
        message = f"{e.reason}: {request.method} {request.path}"
        if "Allow" in e.headers:  # a 405 says which methods the path takes (RFC 9110)
            own["Allow"] = e.headers["Allow"]
        return GatewayError(e.status, message, code=code).response(own)
    except Exception:
        log.exception("unexpected error [%s]", request_id)
        return GatewayError(500, "Internal gateway error", type_="server_error").response(own)
    if not resp.prepared:
        for name, value in own.items():
            resp.headers.setdefault(name, value)
    return resp


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"Request body is larger than {limit} bytes", code="request_too_large")


async def _read_raw(request: web.Request, settings: Settings, deadline: float) -> bytes:
    """The request body, up to ``max_body_bytes``. No read may wait longer than
    ``client_body_timeout`` (nginx's meaning: the gap between two reads, so a slow but
    steady upload passes) and the whole body must arrive before the request's deadline."""
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    content = request.content
    gap = settings.client_body_timeout
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            async with asyncio.timeout_at(min(loop.time() + gap, deadline)):
                chunk = await content.readany()
        except TimeoutError:
            raise GatewayError(
                408, "The request body did not arrive in time.", code="request_timeout"
            ) from None
        except (RequestPayloadError, HttpProcessingError) as e:  # e.g. a bad chunk size
            reason = parse_error_reason(e.__cause__ or e)
            raise GatewayError(
                400, f"The request is not valid HTTP/1.1: {reason}.", code="invalid_http_request"
            ) from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)


async def _read_body(
    request: web.Request, endpoint: str, settings: Settings, deadline: float
) -> tuple[dict[str, Any], bytes]:
    raw = await _read_raw(request, settings, deadline)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise GatewayError(
            400, "We could not parse the JSON body of your request: it is not valid JSON."
        ) from None
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.")
    if raw.count(b"[") + raw.count(b"{") > _MAX_DEPTH:  # only then can it nest that deep
        try:
            orjson.dumps(body)
        except orjson.JSONEncodeError:
            raise GatewayError(
                400, f"The request body nests deeper than {_MAX_DEPTH} levels."
            ) from None
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise GatewayError(
            400, "You must provide a model parameter (a non-empty string).", param="model"
        )
    required = _REQUIRED[endpoint]
    value = body.get(required)
    if value is None:
        raise GatewayError(400, f"Missing required parameter: '{required}'.", param=required)
    if endpoint == "chat/completions" and (not isinstance(value, list) or not value):
        raise GatewayError(400, "'messages' must be a non-empty array.", param="messages")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise GatewayError(400, "'stream' must be a boolean.", param="stream")
    if stream and endpoint == "embeddings":
        raise GatewayError(400, "Embeddings cannot be streamed.", param="stream")
    return body, raw


def _deadline(request: web.Request, settings: Settings) -> tuple[float, bool]:
    """The request's deadline (loop time), and whether the client chose it."""
    timeout = settings.request_timeout
    given = request.headers.get("x-gateway-timeout")
    if given is not None:
        try:
            timeout = float(given)
        except ValueError:
            timeout = -1.0
        if not 0 < timeout <= settings.max_request_timeout:
            most = settings.max_request_timeout
            raise GatewayError(
                400,
                f"x-gateway-timeout must be a number of seconds in (0, {most:g}]",
                code="invalid_timeout",
            )
    return asyncio.get_running_loop().time() + timeout, given is not None


def _proxy(endpoint: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        app = request.app
        settings = app[SETTINGS]
        task = asyncio.current_task()
        assert task is not None
        # In flight from the first byte of the body: a stalled upload is ended with the
        # rest when the shutdown grace runs out.
        app[ACTIVE].add(task)
        try:
            try:
                try:
                    # the body's time counts too
                    deadline, chosen = _deadline(request, settings)
                    body, raw = await _read_body(request, endpoint, settings, deadline)
                except asyncio.CancelledError as e:
                    if e.args != (SHUTDOWN_REASON,):
                        raise
                    task.uncancel()
                    raise shutting_down() from None
            except GatewayError as e:
                metrics.REQUESTS.labels("other", "none", str(e.status), "false").inc()
                raise
            call = Call(
                endpoint=endpoint,
                body=body,
                raw=raw,
                model=body["model"],
                stream=bool(body.get("stream")),
                request_id=request[REQUEST_ID],
                deadline=deadline,
                deadline_chosen=chosen,
            )
            try:
                return await _answer(request, call)
            finally:
                finish(call, app[KNOWN_MODELS], app[REQUEST_LOG], app[status.RECORDER])
        finally:
            app[ACTIVE].discard(task)

    handler.__name__ = f"proxy_{endpoint.replace('/', '_')}"
    return handler


async def _answer(request: web.Request, call: Call) -> web.StreamResponse:
    routes = request.app[ROUTER].route(call.model)
    quotas = request.app[QUOTAS]
    if quotas:  # over its own quota, a client reaches no provider, nor the cache
        try:
            quotas.admit(request.get(CLIENT_KEY), call)
        except GatewayError as e:
            return error_response(call, e)
    try:
        call.rescue = rescue.plan(request.headers, call, request.app[SETTINGS].rescue, routes)
    except GatewayError as e:
        return error_response(call, e)
    cached = request.app.get(CACHED)
    if cached is not None:
        resp = await cached.answer(request, call, routes)
        if resp is not None:
            return resp
    try:
        answer = await run(call, routes)
    except GatewayError as e:
        return error_response(call, e)
    except asyncio.CancelledError as e:
        if e.args == (SHUTDOWN_REASON,):
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            return shutdown_response(call)
        call.result = "cancelled"
        metrics.CLIENT_DISCONNECTS.inc()
        raise
    if isinstance(answer, Reply):
        resp = await send_reply(request, call, answer, request.app[SETTINGS])
    else:
        resp = await relay(request, call, answer)
    if call.failover:
        assert call.answered_by is not None
        log.info("Using %s (failover) [%s]", call.answered_by.display_name, call.request_id)
    return resp


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` as aiohttp does it; any other value gets a clean 417.

    aiohttp runs this before the middlewares, so it answers in the OpenAI shape itself.
    """
    if request.headers.get("Expect", "").lower() == "100-continue":
        if request.version == HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the status line is not part of the body
        return None
    own = _own_headers(_request_id(request))
    return GatewayError(417, "Only 'Expect: 100-continue' is supported.").response(own)


async def _models(request: web.Request) -> web.Response:
    """Aliases plus what the healthy providers serve."""
    app = request.app
    data: dict[str, dict[str, Any]] = {}
    for alias in app[SETTINGS].aliases:
        data[alias] = {"id": alias, "object": "model", "created": 0, "owned_by": "gateway"}
    for provider in app[PROVIDERS].values():
        if not provider.usable():
            continue
        pinned = provider.config.model is not None
        for model in sorted(provider.loaded_models or ()):
            mid = f"{provider.name}/{model}" if pinned else model
            data.setdefault(
                mid, {"id": mid, "object": "model", "created": 0, "owned_by": provider.name}
            )
    return json_response({"object": "list", "data": list(data.values())})


async def _healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _admin_providers(request: web.Request) -> web.Response:
    providers = request.app[PROVIDERS].values()
    return json_response({"providers": [provider_report(p) for p in providers]})


async def _readyz(request: web.Request) -> web.Response:
    # The cache and the shared state are helpers: an unreachable Redis shows here but does
    # not make the gateway unready (each process then keeps its own state).
    cached = request.app.get(CACHED)
    cache = {"cache": cached.cache.health()} if cached is not None else {}
    sharing = request.app.get(SHARING)
    if sharing is not None:
        cache["sharing"] = sharing.health()
    reasons: dict[str, str] = {}
    for provider in request.app[PROVIDERS].values():
        if provider.usable():
            return json_response({"status": "ready", "provider": provider.name, **cache})
        reasons[provider.name] = (
            f"circuit breaker open, retry in {provider.breaker.retry_in():.1f}s"
        )
    return json_response({"status": "unavailable", "providers": reasons, **cache}, status=503)


async def _metrics(request: web.Request) -> web.Response:
    for provider in request.app[PROVIDERS].values():
        provider.breaker.state  # noqa: B018 (an open breaker whose time is up turns half-open)
    return web.Response(body=metrics.exposition(), headers={"Content-Type": metrics.CONTENT_TYPE})


def create_app(
    settings: Settings, *, probes: bool = True, worker: Worker | None = None
) -> web.Application:
    """The gateway application for ``settings``; ``probes=False`` skips health polling;
    ``worker`` when this process is one of several workers (``--workers``)."""
    # Always: even with no keys, /admin/* is for loopback peers only.
    sessions = Sessions()  # the status page's, signed with a secret of this process
    middlewares = [_errors, auth_middleware(settings.access, sessions)]
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[REQUEST_LOG] = RequestLog()
    app[SESSIONS] = sessions
    app[ACTIVE] = set()
    app[QUOTAS] = Quotas(settings.quotas, settings.access.client_keys)

    async def providers_ctx(app: web.Application) -> AsyncIterator[None]:
        redactor = Redactor(cfg.api_key for cfg in settings.providers)
        recorder = status.StatusRecorder(
            [cfg.name for cfg in settings.providers], send_timeout=settings.send_timeout
        )
        providers = {
            cfg.name: Provider(
                cfg,
                DIALECTS[cfg.dialect](cfg, settings.max_event_bytes),
                settings,
                redactor,
                recorder,
            )
            for cfg in settings.providers
        }
        recorder.providers = list(providers.values())
        app[status.RECORDER] = recorder
        sharing = share_providers(settings, providers, worker)
        for provider in providers.values():
            await provider.start(probes=probes)
        if sharing is not None:
            sharing.start()
            app[SHARING] = sharing
        app[PROVIDERS] = providers
        metrics.export_failover_order(list(providers))
        metrics.export_stream_series()
        report = None
        if probes and (worker is None or worker.index == 0):  # one report per machine
            report = asyncio.create_task(log_after_first_probes(list(providers.values())))
        router = Router(
            list(providers.values()),
            {p.name: p.config.model for p in providers.values()},
            settings.aliases,
        )
        app[ROUTER] = router
        app[KNOWN_MODELS] = router.known_models()
        try:
            yield
        finally:
            if report is not None:
                report.cancel()
            if sharing is not None:
                await sharing.close()
            await recorder.close()
            for provider in providers.values():
                await provider.close()

    app.cleanup_ctx.append(providers_ctx)
    # Open status streams end before the server waits for its handlers to finish.
    app.on_shutdown.append(lambda app: app[status.RECORDER].close())
    status.add_routes(app)
    if settings.cache.enabled:
        app.cleanup_ctx.append(_cache_ctx)
    for endpoint in ("chat/completions", "completions", "embeddings"):
        app.router.add_post(f"/v1/{endpoint}", _proxy(endpoint), expect_handler=_expect)
    for path, get in (
        ("/v1/models", _models),
        ("/healthz", _healthz),
        ("/readyz", _readyz),
        ("/admin/providers", _admin_providers),
        ("/metrics", _metrics),
    ):
        app.router.add_get(path, get, expect_handler=_expect)
    return app


async def _cache_ctx(app: web.Application) -> AsyncIterator[None]:
    """The cache's backend (Redis when configured, else memory) and its flights."""
    settings = app[SETTINGS]
    cfg = settings.cache
    if cfg.redis_url is not None:
        from gateway.cache_redis import RedisBackend  # the optional extra: only when used

        backend: Backend = RedisBackend(cfg)
    else:
        backend = MemoryBackend(cfg.max_entries, cfg.max_bytes)
    partitioned = bool(settings.access.client_keys) and not cfg.shared
    cached = CachedAnswers(Cache(cfg, backend, partitioned), settings)
    metrics.export_cache_series()
    metrics.CACHE_BACKEND_UP.set(1)
    app[CACHED] = cached
    try:
        yield
    finally:
        await cached.close()


async def drain(runner: web.AppRunner, grace: float) -> None:
    """Graceful stop: refuse new connections, let requests in flight finish for up to
    ``grace`` seconds, then end the rest (streams get an error event) and clean up."""
    app = runner.app
    for site in list(runner.sites):
        await site.stop()
    active = app[ACTIVE]
    if active:
        log.info("waiting up to %gs for %d request(s) in flight", grace, len(active))
        await asyncio.wait(list(active), timeout=grace)
    if active:
        log.warning("ending %d request(s) still in flight", len(active))
        for task in list(active):
            task.cancel(SHUTDOWN_REASON)
        await asyncio.wait(list(active), timeout=5)
    await runner.cleanup()
