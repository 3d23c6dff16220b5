"""``python -m gateway``: load the configuration and serve until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TextIO

from aiohttp import web

from gateway.auth import exposure_warning
from gateway.config import ConfigError, Settings, load_settings, parse_workers
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
    parser.add_argument(
        "--workers",
        help="processes serving the port, or auto for one per core (env GATEWAY_WORKERS, "
        "default 1)",
    )
    return parser.parse_args(argv)


def _listen(host: str, port: int, reuse_port: bool = False) -> list[socket.socket]:
    """Bind the listening sockets, before anything else starts (probes, demo upstreams'
    traffic), so that a taken port is reported alone and at once.

    Binds every address ``host`` resolves to, as ``loop.create_server`` would;
    ``reuse_port`` lets the supervisor and its workers bind the same port.
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
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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


def _fd_headroom(needed: int) -> None:
    """Raise the soft limit on open files toward ``needed``: every request in flight holds
    a client and an upstream connection, and the usual soft limit (1024) would make a busy
    gateway fail to accept long before ``max_client_connections``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        log.warning(
            "open files are limited to %d (ulimit -n): fewer than max_client_connections "
            "needs (%d)",
            target,
            needed,
        )


def _address(host: str, port: int) -> str:
    """``host:port`` for a browser on this machine: every interface is reachable as loopback."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(args: argparse.Namespace, log_stream: TextIO | None = None) -> None:
    """Run the gateway until a stop signal arrives; request lines go straight to
    ``log_stream`` when given (see :mod:`gateway.request_log`)."""
    from gateway import metrics, workers
    from gateway.connections import GatewayRunner
    from gateway.demo import DEMO_DEFAULTS, start_demo_upstreams
    from gateway.server import REQUEST_LOG, create_app, drain

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
        count = parse_workers("--workers", args.workers) if args.workers else settings.workers
        worker = workers.this_worker(count)
        if worker is None and count > 1:
            if args.demo:
                raise StartupError("--demo runs in one process: leave out --workers")
            sockets = _listen(host, port, reuse_port=True)  # held while workers come and go
            await _supervise(args, settings, host, port, count)
            return
        # A worker shares the port with its supervisor and the other workers.
        sockets = _listen(host, port, reuse_port=True) if worker else _listen(host, port)
        _fd_headroom(2 * settings.max_client_connections + 256)

        if worker is not None:
            metrics.set_worker(worker.index)
            if workers.restarted():
                metrics.WORKER_RESTARTS.inc()
        app = create_app(settings, worker=worker)
        if log_stream is not None:
            app[REQUEST_LOG].attach(log_stream)
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
        if exposed and worker is None:
            log.warning("%s", exposed)
        for sock in sockets:
            await web.SockSite(runner, sock, backlog=settings.backlog).start()
        gc.freeze()  # start-up objects are long-lived: keep them out of every later collection
        background: list[asyncio.Task[None]] = []
        stop = asyncio.Event()
        if worker is not None:
            log.info("worker %d of %d serving (pid %d)", worker.index, worker.count, os.getpid())
            background.append(asyncio.create_task(workers.watch_parent(stop)))
        else:
            chain = ", ".join(f"{p.display_name} ({p.base_url})" for p in settings.providers)
            log.info("gateway listening on http://%s:%d; failover order: %s", host, port, chain)
        if metrics.MULTIPROCESS:
            background.append(asyncio.create_task(_refresh_metrics()))
        if args.demo:
            log.info("demo: watch failover live at http://%s/status", _address(host, port))
            log.info(
                "demo: try  curl -s localhost:%d/v1/chat/completions"
                " -H 'Content-Type: application/json'"
                ' -d \'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}\'',
                port,
            )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
        for task in background:
            task.cancel()
        await drain(runner, settings.shutdown_grace)
        app[REQUEST_LOG].flush()
    finally:
        if runner is not None:
            await runner.cleanup()
        for sock in sockets:
            sock.close()  # a no-op once the sites have closed them
        for demo in demo_runners:
            await demo.cleanup()


async def _supervise(
    args: argparse.Namespace, settings: Settings, host: str, port: int, count: int
) -> None:
    """Run ``count`` workers on ``host:port`` until SIGINT or SIGTERM (gateway.workers)."""
    from gateway.workers import Supervisor

    exposed = exposure_warning(host, port, settings.access)
    if exposed:
        log.warning("%s", exposed)
    argv = ["--host", host, "--port", str(port)]
    if args.config:
        argv += ["--config", args.config]
    chain = ", ".join(f"{p.display_name} ({p.base_url})" for p in settings.providers)
    shared = "Redis" if settings.shared_redis else "the supervisor's hub"
    log.info(
        "gateway listening on http://%s:%d with %d workers sharing provider state through "
        "%s; failover order: %s",
        host,
        port,
        count,
        shared,
        chain,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await Supervisor(settings, count, argv).run(stop)


async def _refresh_metrics() -> None:
    """Write this worker's computed gauges once a second (multiprocess metrics)."""
    from gateway import metrics

    while True:
        await asyncio.sleep(1.0)
        metrics.refresh()


def _event_loop(choice: str) -> Callable[[Coroutine[Any, Any, None]], None]:
    """How to run the gateway: with uvloop when it is installed (``pip install
    'llm-failover-gateway[fast]'``; it cuts the CPU per request, see bench/README.md) unless
    ``GATEWAY_EVENT_LOOP=asyncio``; ``uvloop`` insists on it."""
    choice = choice.strip().lower()
    if choice not in ("auto", "asyncio", "uvloop"):
        raise ConfigError("GATEWAY_EVENT_LOOP", f"must be auto, asyncio or uvloop, got {choice!r}")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError(
                    "GATEWAY_EVENT_LOOP", "uvloop is not installed (pip install uvloop)"
                ) from None
        else:
            return uvloop.run  # type: ignore[no-any-return]
    return asyncio.run


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    handler = logging.StreamHandler()
    # Escapes CR, LF and ANSI in every message: strings from clients and upstreams reach
    # some of them (model names, upstream error messages).
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    args = _parse_args(argv)
    try:
        run = _event_loop(os.environ.get("GATEWAY_EVENT_LOOP", "auto"))
        run(serve(args, handler.stream))
    except ConfigError as e:
        print(f"gateway: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    except StartupError as e:
        print(f"gateway: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
