"""`python -m gateway --demo`: the newcomer's first run, as a real process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import aiohttp
import pytest

from tests.conftest import chat, wait_ready


@pytest.fixture
def demo(unused_tcp_port):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI", "LMSTUDIO", "OLLAMA", "GATEWAY"))
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "--demo",
            "--host",
            "127.0.0.1",
            "--port",
            str(unused_tcp_port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    yield proc, f"http://127.0.0.1:{unused_tcp_port}"
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    proc.stdout.close()


async def test_demo_shows_failover_and_stops_cleanly(demo):
    proc, base = demo
    await wait_ready(base)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/v1/chat/completions", json=chat()) as r:
            assert r.status == 200
            assert r.headers["x-gateway-provider"] == "lmstudio"
            assert r.headers["x-gateway-failover"] == "true"
            body = await r.json()
        async with s.post(f"{base}/v1/chat/completions", json=chat(stream=True)) as r:
            text = await r.text()
            assert text.rstrip().endswith("data: [DONE]")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    log = proc.stdout.read()
    assert "OpenAI rate limit exceeded, failing over to LM Studio" in log
    assert "Using LM Studio (failover)" in log
    assert "demo-key" not in log
    assert "steady upstream" in body["choices"][0]["message"]["content"]


# --------------------------------------------------------------------------- start-up errors
# Every start-up problem is one line on stderr, exit status 2, naming the fix: no traceback.


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any gateway setting, plus ``extra``.

    No provider is probed: OpenAI has no key, LM Studio points at a closed loopback port and
    Ollama is disabled, so nothing but the error under test can reach stderr.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI", "LMSTUDIO", "OLLAMA", "GATEWAY", "FAILOVER"))
    }
    env.update({"LMSTUDIO_BASE_URL": "http://127.0.0.1:9/v1", "OLLAMA_BASE_URL": ""})
    env.update(extra)
    return env


def start_up(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run ``python -m gateway ARGS`` until it exits; its status and its stderr lines."""
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return proc.returncode, proc.stderr.strip().splitlines()


@pytest.fixture
def taken_port():
    """A loopback port on which another program already listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


IN_USE = (
    "gateway: cannot listen on 127.0.0.1:{port}: address already in use; "
    "choose another port with --port or GATEWAY_PORT"
)


@pytest.mark.parametrize("how", ["--port", "--demo --port", "GATEWAY_PORT"])
def test_port_in_use_is_one_line(taken_port, how):
    if how == "GATEWAY_PORT":
        args = ["--host", "127.0.0.1"]
        env = clean_env(GATEWAY_PORT=str(taken_port))
    else:
        args = [*how.split(), str(taken_port), "--host", "127.0.0.1"]
        env = clean_env()
    assert start_up(*args, env=env) == (2, [IN_USE.format(port=taken_port)])


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_port_out_of_range_is_one_line(port):
    assert start_up("--host", "127.0.0.1", "--port", port) == (
        2,
        [
            f"gateway: cannot listen on 127.0.0.1:{port}: a port is a number from 1 to 65535; "
            "choose another port with --port or GATEWAY_PORT"
        ],
    )


def test_port_that_is_not_a_number_is_one_line():
    assert start_up("--port", "eighty") == (
        2,
        ["gateway: argument --port: invalid int value: 'eighty' (see python -m gateway --help)"],
    )


def test_host_that_cannot_be_bound_is_one_line(unused_tcp_port):
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): no machine has it, so binding it fails at once.
    assert start_up("--host", "192.0.2.1", "--port", str(unused_tcp_port)) == (
        2,
        [
            f"gateway: cannot listen on 192.0.2.1:{unused_tcp_port}: this machine has no such "
            "address; choose another address with --host or GATEWAY_HOST"
        ],
    )


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"GATEWAY_LOG_LEVEL": "verbose"},
            "GATEWAY_LOG_LEVEL: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, "
            "got 'verbose'",
        ),
        (
            {"GATEWAY_REQUEST_TIMEOUT": "nan"},
            "GATEWAY_REQUEST_TIMEOUT: must be a finite number, got 'nan'",
        ),
        (
            {"GATEWAY_SHUTDOWN_GRACE": "inf"},
            "GATEWAY_SHUTDOWN_GRACE: must be a finite number, got 'inf'",
        ),
        (
            {"GATEWAY_REQUEST_TIMEOUT": "900"},
            "GATEWAY_REQUEST_TIMEOUT: must not exceed max_request_timeout (600); "
            "raise max_request_timeout under [gateway] in the TOML file, got 900",
        ),
        ({"GATEWAY_PORT": "70000"}, "GATEWAY_PORT: must be 1-65535, got 70000"),
    ],
)
def test_bad_environment_names_the_variable(env, line):
    assert start_up(env=clean_env(**env)) == (2, [f"gateway: configuration error: {line}"])


def test_missing_config_file_names_the_flag(tmp_path):
    missing = tmp_path / "nope.toml"
    assert start_up("--config", str(missing)) == (
        2,
        [
            f"gateway: configuration error: --config: cannot read {missing}: No such file or directory"
        ],
    )
