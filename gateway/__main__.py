"""``python -m gateway``: load the configuration and serve until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys

from aiohttp import web

from gateway.auth import exposure_warning
from gateway.config import ConfigError, load_settings
from gateway.logsafe import SafeFormatter

log = logging.getLogger("gateway")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gateway", description="OpenAI-compatible LLM gateway with provider failover"
    )
    parser.add_argument(
        "--host",
        help="address to listen on (env GATEWAY_HOST, default 0.0.0.0; 127.0.0.1 with --demo)",
    )
    parser.add_argument(
        "--port", type=int, help="port to listen on (env GATEWAY_PORT, default 8080)"
    )
    parser.add_argument("--config", help="TOML configuration file (env GATEWAY_CONFIG)")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="start two simulated upstreams on loopback and route to them (no keys needed)",
    )
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    """Run the gateway until a stop signal arrives."""
    from gateway.connections import GatewayRunner
    from gateway.demo import DEMO_DEFAULTS, start_demo_upstreams
    from gateway.server import create_app, drain

    env = dict(os.environ)
    if args.config:
        env["GATEWAY_CONFIG"] = args.config
    demo_runners: list[web.AppRunner] = []
    if args.demo:
        demo_env, demo_runners = await start_demo_upstreams()
        env = {**DEMO_DEFAULTS, **env, **demo_env}
    settings = load_settings(env)
    logging.getLogger().setLevel(settings.log_level.upper())
    host = args.host or settings.host
    port = args.port or settings.port

    app = create_app(settings)
    runner = GatewayRunner(
        app,
        settings,  # client header/body timeouts, idle keep-alive, the connection cap
        handler_cancellation=True,  # a client that leaves cancels its upstream call at once
        access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
    )
    await runner.setup()
    exposed = exposure_warning(host, port, settings.access)
    if exposed:
        log.warning("%s", exposed)
    site = web.TCPSite(runner, host, port)
    await site.start()
    gc.freeze()  # start-up objects are long-lived: keep them out of every later collection
    chain = ", ".join(f"{p.display_name} ({p.base_url})" for p in settings.providers)
    log.info("gateway listening on http://%s:%d; failover order: %s", host, port, chain)
    if args.demo:
        log.info(
            "demo: try  curl -s localhost:%d/v1/chat/completions"
            " -H 'Content-Type: application/json'"
            ' -d \'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}\'',
            port,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down")
        await drain(runner, settings.shutdown_grace)
    finally:
        await runner.cleanup()
        for demo in demo_runners:
            await demo.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    handler = logging.StreamHandler()
    # Escapes CR, LF and ANSI in every message: strings from clients and upstreams reach
    # some of them (model names, upstream error messages).
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    args = _parse_args(argv)
    try:
        asyncio.run(serve(args))
    except ConfigError as e:
        print(f"gateway: configuration error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
