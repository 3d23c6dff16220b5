"""Hostile clients on raw loopback sockets, and a real ``python -m gateway`` to aim them at.

Clients that trickle their headers, stall their body, stay silent or send malformed HTTP
are written byte by byte with asyncio streams: an HTTP library would refuse to misbehave.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import orjson

from tests import conftest
from tests.conftest import GatewayProcess, process_env

# How long a test waits for the gateway to close a connection, at most. The timeouts under
# test are set far below it (0.5 s), so only a connection that is never closed reaches it.
CLOSE_WAIT = 20.0

CHAT_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"


@asynccontextmanager
async def gateway_process(
    port: int, upstream_url: str, **env: str
) -> AsyncIterator[GatewayProcess]:
    """``python -m gateway`` on 127.0.0.1:``port`` with one provider and ``env`` on top."""
    full = process_env(OPENAI_BASE_URL=upstream_url, OPENAI_API_KEY="sk-x", **env)
    async with conftest.gateway_process(port, full) as gw:
        yield gw


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw TCP connection to the gateway."""
    return await asyncio.open_connection("127.0.0.1", port)


async def read_until_closed(reader: asyncio.StreamReader, wait: float = CLOSE_WAIT) -> bytes:
    """Everything the gateway sends until it closes the connection (a reset counts as a
    close); fails if the connection is still open after ``wait`` seconds."""
    data = b""
    try:
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                data += chunk
    except ConnectionError:
        pass
    except TimeoutError:
        raise AssertionError(f"the gateway kept the connection open (got {data[:200]!r})") from None
    return data


async def trickle(writer: asyncio.StreamWriter, data: bytes, pause: float) -> None:
    """Send ``data`` one byte at a time, ``pause`` seconds apart, until it is sent or the
    gateway hangs up."""
    with suppress(ConnectionError):
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(pause)


@dataclass
class Answer:
    """A raw HTTP response: status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, object]:
        """The OpenAI-shaped error object of a JSON error body."""
        assert self.headers.get("content-type", "").startswith("application/json"), self
        err = orjson.loads(self.body)["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        return err


def parse_answer(data: bytes) -> Answer:
    """Parse one HTTP/1.x response (with a Content-Length body) from raw bytes."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response in {data[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(body)))
    return Answer(status, headers, body[:length])


def open_client_sockets(pid: int, port: int) -> int:
    """Established TCP connections to ``port`` that process ``pid`` holds (from /proc).

    Connections still waiting in the kernel's accept queue are not counted: only what
    the gateway has accepted.
    """
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):
        with open(table) as f:
            next(f)
            for row in f:
                cols = row.split()
                local_port = int(cols[1].rsplit(":", 1)[1], 16)
                if local_port == port and cols[3] == "01" and cols[9] in inodes:
                    count += 1
    return count
