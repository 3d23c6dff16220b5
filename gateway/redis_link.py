"""One Redis, for one purpose (the cache, the shared provider state), through
``redis.asyncio`` (the optional extra ``redis``): bounded waits, and a clear account of
what happens while it is unreachable.

Redis is a helper, never a dependency of an answer. A command that fails or takes longer
than ``timeout`` returns None (the caller falls back: a cache miss, local state), and
Redis is then left alone for ``retry`` seconds, after which the next command tries it
again: the gateway recovers by itself when Redis is back. One warning is logged when it
becomes unreachable and one line when it answers again; :meth:`RedisLink.health` says so
for ``/readyz``. Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.redact import Redactor

log = logging.getLogger("gateway")

#: What a failed command may raise.
ERRORS = (RedisError, OSError, TimeoutError)


class RedisLink:
    """A connection pool to the Redis at ``url`` and its reachability.

    ``purpose`` names it in the log (``cache``), ``fallback`` says what the gateway does
    meanwhile; ``on_up`` is told each change of reachability and ``on_error`` each failed
    or skipped command (for metrics).
    """

    def __init__(
        self,
        url: str,
        timeout: float,
        retry: float,
        *,
        purpose: str,
        fallback: str,
        on_up: Callable[[bool], None],
        on_error: Callable[[str], None],
        pool_size: int = 64,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.retry = retry
        self.purpose = purpose
        self.fallback = fallback
        self._on_up = on_up
        self._on_error = on_error
        parts = urlsplit(url)
        self.redact = Redactor([parts.password])
        # Where, for the log and /readyz: never the URL, which may hold a password.
        self.where = f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else parts.path
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=pool_size,
            timeout=timeout,  # the wait for a free connection
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # a failure falls back at once, never a wait
        )
        self.client = redis.Redis(connection_pool=pool)
        self._down_until = 0.0  # loop time before which Redis is left alone
        self.error: str | None = None  # why it is unreachable
        self.since: float | None = None  # Unix time it became unreachable
        on_up(True)

    @property
    def up(self) -> bool:
        """False while Redis is known to be unreachable."""
        return self.error is None

    def resting(self) -> bool:
        """True while Redis is left alone after a failure (no command is sent)."""
        return asyncio.get_running_loop().time() < self._down_until

    async def run(self, op: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run ``script`` (registered on :attr:`client`); None when Redis is down or does
        not answer in time."""
        return await self.call(op, lambda: script(keys=keys, args=args))

    async def call(self, op: str, command: Callable[[], Awaitable[Any]]) -> Any:
        """Await ``command()`` (a command or a pipeline on :attr:`client`) within the
        timeout; None when Redis is down or does not answer in time."""
        if self.resting():
            self._on_error(op)
            return None
        try:
            async with asyncio.timeout(self.timeout):
                result = await command()
        except ERRORS as e:
            self.failed(op, e)
            return None
        self.answered()
        return result

    def failed(self, op: str, e: BaseException) -> None:
        """A command ``op`` failed with ``e``: fall back for ``retry`` seconds."""
        self._on_error(op)
        self._down_until = asyncio.get_running_loop().time() + self.retry
        why = self.redact.text(str(e) or type(e).__name__)
        if self.error is None:
            log.warning(
                "%s: Redis at %s is unreachable (%s): %s; trying again every %gs",
                self.purpose,
                self.where,
                why,
                self.fallback,
                self.retry,
            )
            self.since = time.time()
            self._on_up(False)
        self.error = why

    def answered(self) -> None:
        """A command succeeded: Redis is back, if it was away."""
        if self.error is not None:
            log.info("%s: Redis at %s answers again", self.purpose, self.where)
            self.error = self.since = None
            self._on_up(True)

    def health(self) -> dict[str, Any]:
        """For ``/readyz``: ``ok``, or ``unreachable`` with the error and since when."""
        if self.error is None:
            return {"backend": "redis", "status": "ok"}
        assert self.since is not None
        return {
            "backend": "redis",
            "status": "unreachable",
            "error": self.error,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since)),
        }

    async def close(self) -> None:
        """Close the connections."""
        await self.client.aclose()
        await self.client.connection_pool.disconnect()
