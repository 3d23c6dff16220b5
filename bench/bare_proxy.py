"""A bare aiohttp pass-through proxy: the framework's own cost, with no gateway features.

One ``ClientSession`` with keep-alive, no parsing, no breakers, no metrics, no logging:
the request body goes to ``--upstream`` unchanged, a JSON answer comes back as one body,
and an event stream is piped read by read. The benchmark runs it as a second yardstick
beside nginx, so that the gateway's overhead can be split into what aiohttp costs and
what the gateway's features cost.

Run: ``python bench/bare_proxy.py --port 9200 --upstream http://127.0.0.1:9100``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def proxy(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    body = await request.read()
    url = request.app[UPSTREAM] + request.rel_url.path_qs
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    async with session.request(request.method, url, data=body, headers=headers) as up:
        ctype = up.headers.get("Content-Type", "application/json")
        if not ctype.startswith("text/event-stream"):
            return web.Response(
                status=up.status, body=await up.read(), headers={"Content-Type": ctype}
            )
        resp = web.StreamResponse(
            status=up.status,
            headers={"Content-Type": ctype, "Cache-Control": "no-cache"},
        )
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


def create_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=1000, limit_per_host=0, keepalive_timeout=30)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            app[SESSION] = session
            yield

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


async def serve(host: str, port: int, upstream: str) -> None:
    runner = web.AppRunner(create_app(upstream), access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"bare aiohttp proxy on http://{host}:{port} -> {upstream}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9100")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.upstream))


if __name__ == "__main__":
    main()
