"""The cache in Redis (``REDIS_URL`` or ``[cache] redis_url``), shared by every gateway
process that points at it, through ``redis.asyncio`` (the optional extra ``redis``).

The bounds are the in-memory cache's: each entry has its TTL (``PX``), and two Lua
scripts keep an LRU index (a sorted set of last use), each entry's size (a hash) and the
total (a counter), evicting the least recently used entries past ``max_entries`` or
``max_bytes`` atomically, whichever process writes. An entry that expired by itself still
counts until the index reaches it, so the total is an upper bound of what Redis holds.
Every key shares one hash tag, so the scripts also run on a Redis Cluster.

Redis is a helper, never a dependency of an answer: a command that fails or takes longer
than ``redis_timeout`` makes the request go upstream as a miss, and Redis is then left
alone for ``redis_retry`` seconds, after which the next request tries it again. The
metric ``gateway_cache_backend_up`` and ``/readyz`` say when it is unreachable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway import metrics
from gateway.cache import ENTRY_OVERHEAD, Entry
from gateway.config import CacheSettings
from gateway.redact import Redactor

log = logging.getLogger("gateway")

PREFIX = "gwcache:{v1}:"  # the braces: one hash slot for every key
_ENTRY = PREFIX + "e:"
_LRU = PREFIX + "lru"  # sorted set: member = key, score = last use (ms, Redis's clock)
_SIZES = PREFIX + "sizes"  # hash: key -> its size in bytes
_TOTAL = PREFIX + "bytes"  # the sum of the sizes
_POOL_SIZE = 64  # connections; a command waits up to redis_timeout for one

_GET = """
local value = redis.call('GET', KEYS[1])
if value then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], 'XX', t[1] * 1000 + math.floor(t[2] / 1000), ARGV[1])
end
return value
"""

# KEYS: the entry, the index, the sizes, the total. ARGV: key, value, ttl (ms), size,
# max_entries, max_bytes. Evicted entries' names are built from KEYS[1]'s prefix: they
# share its hash slot.
_SET = """
local prefix = string.sub(KEYS[1], 1, -(#ARGV[1] + 1))
local old = redis.call('HGET', KEYS[3], ARGV[1])
if old then redis.call('DECRBY', KEYS[4], old) end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], t[1] * 1000 + math.floor(t[2] / 1000), ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
local total = redis.call('INCRBY', KEYS[4], ARGV[4])
local max_entries, max_bytes = tonumber(ARGV[5]), tonumber(ARGV[6])
local evicted, expired = 0, 0
while redis.call('ZCARD', KEYS[2]) > max_entries or total > max_bytes do
  local oldest = redis.call('ZPOPMIN', KEYS[2])
  if #oldest == 0 then break end
  local key = oldest[1]
  local size = tonumber(redis.call('HGET', KEYS[3], key) or '0')
  redis.call('HDEL', KEYS[3], key)
  total = redis.call('DECRBY', KEYS[4], size)
  if redis.call('DEL', prefix .. key) == 1 then
    evicted = evicted + 1
  else
    expired = expired + 1
  end
end
return {total, evicted, expired}
"""


class RedisBackend:
    """Entries in Redis, with the same bounds as the in-memory cache."""

    name = "redis"

    def __init__(self, settings: CacheSettings) -> None:
        """Connects lazily: an unreachable Redis at start-up is a miss, not an error."""
        url = settings.redis_url
        assert url is not None
        self.max_entries = settings.max_entries
        self.max_bytes = settings.max_bytes
        self.timeout = settings.redis_timeout
        self.retry = settings.redis_retry
        parts = urlsplit(url)
        self._redact = Redactor([parts.password])
        # Where, for the log and /readyz: never the URL, which may hold a password.
        self.where = f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else parts.path
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=_POOL_SIZE,
            timeout=self.timeout,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),  # a failure is a miss at once, never a wait
        )
        self._client = redis.Redis(connection_pool=pool)
        self._get = self._client.register_script(_GET)
        self._set = self._client.register_script(_SET)
        self._down_until = 0.0  # loop time before which Redis is left alone
        self.error: str | None = None  # why it is unreachable
        self.since: float | None = None  # Unix time it became unreachable
        metrics.CACHE_BACKEND_UP.set(1)

    async def get(self, key: str) -> Entry | None:
        """The entry under ``key``, or None (missing, expired, or Redis unreachable)."""
        data = await self._run("get", self._get, [_ENTRY + key, _LRU], [key])
        if not isinstance(data, bytes):
            return None
        try:
            return Entry.decode(data)
        except ValueError:  # not written by this gateway: a miss
            return None

    async def set(self, key: str, entry: Entry, ttl: float) -> bool:
        """Store ``entry``, evicting the least recently used past the bounds."""
        value = entry.encode()
        size = len(value) + len(key) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return False
        ms = max(1, int(ttl * 1000))
        args = [key, value, ms, size, self.max_entries, self.max_bytes]
        done = await self._run("set", self._set, [_ENTRY + key, _LRU, _SIZES, _TOTAL], args)
        if not isinstance(done, list) or len(done) != 3:
            return False
        total, evicted, expired = done
        metrics.CACHE_SIZE.set(total)
        if evicted:
            metrics.CACHE_EVICTIONS.labels("size").inc(evicted)
        if expired:
            metrics.CACHE_EVICTIONS.labels("expired").inc(expired)
        return True

    async def _run(self, op: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run ``script``; None when Redis is down or does not answer in time."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._down_until:
            metrics.CACHE_BACKEND_ERRORS.labels(op).inc()
            return None
        try:
            async with asyncio.timeout(self.timeout):
                result = await script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as e:
            self._failed(op, e, loop.time())
            return None
        if self.error is not None:
            log.info("cache: Redis at %s answers again", self.where)
            self.error = self.since = None
            metrics.CACHE_BACKEND_UP.set(1)
        return result

    def _failed(self, op: str, e: BaseException, now: float) -> None:
        metrics.CACHE_BACKEND_ERRORS.labels(op).inc()
        self._down_until = now + self.retry
        why = self._redact.text(str(e) or type(e).__name__)
        if self.error is None:
            log.warning(
                "cache: Redis at %s is unreachable (%s): requests go upstream as misses; "
                "trying again every %gs",
                self.where,
                why,
                self.retry,
            )
            self.since = time.time()
            metrics.CACHE_BACKEND_UP.set(0)
        self.error = why

    def health(self) -> dict[str, Any]:
        """For ``/readyz``: ``ok``, or ``unreachable`` with the error and since when."""
        if self.error is None:
            return {"backend": self.name, "status": "ok"}
        assert self.since is not None
        return {
            "backend": self.name,
            "status": "unreachable",
            "error": self.error,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since)),
        }

    async def close(self) -> None:
        """Close the connections."""
        await self._client.aclose()
        await self._client.connection_pool.disconnect()
