"""Safe by default (issue 11, item 10): a gateway reachable from other hosts without
client keys says so at start-up, and the demo listens on loopback only."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from gateway.auth import AccessPolicy, digest, exposure_warning
from tests.conftest import wait_ready

OPEN = AccessPolicy()
KEYED = AccessPolicy(frozenset({digest("k")}))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.0.2.1", "gpu-box.lan"])
def test_exposed_without_keys_is_warned(host):
    warning = exposure_warning(host, 8080, OPEN)
    assert warning is not None
    assert "GATEWAY_API_KEYS" in warning and "8080" in warning
    assert exposure_warning(host, 8080, KEYED) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_is_not_warned(host):
    assert exposure_warning(host, 8080, OPEN) is None


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI", "LMSTUDIO", "OLLAMA", "GATEWAY"))
    }
    return {**env, **extra}


def test_process_warns_before_listening_on_other_hosts(unused_tcp_port):
    """The process is told to listen on every interface (0.0.0.0) without client keys; its
    socket is bound on loopback all the same (the test never listens beyond it), and the
    warning comes before the first connection is accepted."""
    script = (
        "import gateway.__main__ as m; real = m._listen; "
        "m._listen = lambda host, port: real('127.0.0.1', port); "
        f"m.main(['--host', '0.0.0.0', '--port', '{unused_tcp_port}'])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env=clean_env(OLLAMA_BASE_URL="", LMSTUDIO_BASE_URL="http://127.0.0.1:9"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        for line in proc.stderr:  # bounded: the process logs "listening" within seconds
            lines.append(line)
            if "gateway listening" in line or len(lines) > 50:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stderr.close()
    warnings = [line for line in lines if "WARNING" in line]
    assert any("GATEWAY_API_KEYS" in line and "0.0.0.0" in line for line in warnings), lines
    assert lines.index(warnings[0]) < len(lines) - 1  # before "listening"


def listening_addresses(pid: int, port: int) -> set[str]:
    """Local addresses (hex, as /proc shows them) that ``pid`` listens on at ``port``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):
        with open(table) as f:
            next(f)
            for row in f:
                cols = row.split()
                addr, local_port = cols[1].rsplit(":", 1)
                if int(local_port, 16) == port and cols[3] == "0A" and cols[9] in inodes:
                    found.add(addr)
    return found


async def test_demo_listens_on_loopback_by_default(unused_tcp_port):
    port = unused_tcp_port
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once; read when it stops)
        [sys.executable, "-m", "gateway", "--demo", "--port", str(port)],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        await wait_ready(f"http://127.0.0.1:{port}")
        addresses = listening_addresses(proc.pid, port)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
        log = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
    assert addresses == {"0100007F"}  # 127.0.0.1, nothing else
    assert f"listening on http://127.0.0.1:{port}" in log
    assert "GATEWAY_API_KEYS" not in log  # on loopback, nothing to warn about
