"""``python -m gateway``: load the configuration and serve until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import os
import signal
import socket
import sys
from typing import NoReturn

from aiohttp import web

from gateway.auth import exposure_warning
from gateway.config import ConfigError, load_settings
from gateway.logsafe import SafeFormatter

log = logging.getLogger("gateway")

_CHOOSE_PORT = "choose another port with --port or GATEWAY_PORT"
_CHOOSE_HOST = "choose another address with --host or GATEWAY_HOST"
# What a failed bind means for the user, and what to change, by errno.
_BIND_ERRORS = {
    errno.EADDRINUSE: ("address already in use", _CHOOSE_PORT),
    errno.EACCES: ("permission denied (ports below 1024 need privileges)", _CHOOSE_PORT),
    errno.EADDRNOTAVAIL: ("this machine has no such address", _CHOOSE_HOST),
}


class StartupError(Exception):
    """The gateway cannot start; the message is the one line the user sees."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other start-up problem."""

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as one line and exit 2 (argparse adds a usage block)."""
        self.exit(2, f"{self.prog}: {message} (see python -m gateway --help)\n")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
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


def _listen(host: str, port: int) -> list[socket.socket]:
    """Bind the listening sockets, before anything else starts (probes, demo upstreams'
    traffic), so that a taken port is reported alone and at once.

    Binds every address ``host`` resolves to, as ``loop.create_server`` would.
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not 0 < port < 65536:
        raise StartupError(
            f"cannot listen on {where}: a port is a number from 1 to 65535; {_CHOOSE_PORT}"
        )
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) else str(e)
        raise StartupError(f"cannot listen on {where}: {reason}; {_CHOOSE_HOST}") from None
    sockets: list[socket.socket] = []
    try:
        for family, type_, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # the IPv4 address gets a socket of its own
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.setblocking(False)
    except OSError as e:
        for sock in sockets:
            sock.close()
        what, fix = _BIND_ERRORS.get(
            e.errno or 0, (e.strerror or str(e), f"{_CHOOSE_HOST}, or {_CHOOSE_PORT}")
        )
        raise StartupError(f"cannot listen on {where}: {what}; {fix}") from None
    return sockets


def _address(host: str, port: int) -> str:
    """``host:port`` for a browser on this machine: every interface is reachable as loopback."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(args: argparse.Namespace) -> None:
    """Run the gateway until a stop signal arrives."""
    from gateway.connections import GatewayRunner
    from gateway.demo import DEMO_DEFAULTS, start_demo_upstreams
    from gateway.server import create_app, drain

    env = dict(os.environ)
    if args.config:
        env["GATEWAY_CONFIG"] = args.config
    demo_runners: list[web.AppRunner] = []
    runner: web.AppRunner | None = None
    sockets: list[socket.socket] = []
    try:
        if args.demo:
            demo_env, demo_runners = await start_demo_upstreams()
            env = {**DEMO_DEFAULTS, **env, **demo_env}
        settings = load_settings(env, config_key="--config" if args.config else "GATEWAY_CONFIG")
        logging.getLogger().setLevel(settings.log_level)
        host = args.host if args.host is not None else settings.host
        port = args.port if args.port is not None else settings.port
        sockets = _listen(host, port)

        app = create_app(settings)
        runner = GatewayRunner(
            app,
            settings,  # client header/body timeouts, idle keep-alive, the connection cap
            handler_cancellation=True,  # a client that leaves cancels its upstream call at once
            access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
        )
        await runner.setup()
        # After the bind (a port that cannot be had is one line, nothing else), before the
        # first connection is accepted.
        exposed = exposure_warning(host, port, settings.access)
        if exposed:
            log.warning("%s", exposed)
        for sock in sockets:
            await web.SockSite(runner, sock).start()
        gc.freeze()  # start-up objects are long-lived: keep them out of every later collection
        chain = ", ".join(f"{p.display_name} ({p.base_url})" for p in settings.providers)
        log.info("gateway listening on http://%s:%d; failover order: %s", host, port, chain)
        if args.demo:
            log.info("demo: watch failover live at http://%s/status", _address(host, port))
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
        await stop.wait()
        log.info("shutting down")
        await drain(runner, settings.shutdown_grace)
    finally:
        if runner is not None:
            await runner.cleanup()
        for sock in sockets:
            sock.close()  # a no-op once the sites have closed them
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
    except StartupError as e:
        print(f"gateway: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
