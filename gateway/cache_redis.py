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

from typing import Any

from gateway import metrics
from gateway.cache import ENTRY_OVERHEAD, Entry
from gateway.config import CacheSettings
from gateway.redis_link import RedisLink

PREFIX = "gwcache:{v1}:"  # the braces: one hash slot for every key
_ENTRY = PREFIX + "e:"
_LRU = PREFIX + "lru"  # sorted set: member = key, score = last use (ms, Redis's clock)
_SIZES = PREFIX + "sizes"  # hash: key -> its size in bytes
_TOTAL = PREFIX + "bytes"  # the sum of the sizes

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
        self.link = RedisLink(
            url,
            settings.redis_timeout,
            settings.redis_retry,
            purpose="cache",
            fallback="requests go upstream as misses",
            on_up=lambda up: metrics.CACHE_BACKEND_UP.set(1 if up else 0),
            on_error=lambda op: metrics.CACHE_BACKEND_ERRORS.labels(op).inc(),
        )
        self._get = self.link.client.register_script(_GET)
        self._set = self.link.client.register_script(_SET)

    async def get(self, key: str) -> Entry | None:
        """The entry under ``key``, or None (missing, expired, or Redis unreachable)."""
        data = await self.link.run("get", self._get, [_ENTRY + key, _LRU], [key])
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
        done = await self.link.run("set", self._set, [_ENTRY + key, _LRU, _SIZES, _TOTAL], args)
        if not isinstance(done, list) or len(done) != 3:
            return False
        total, evicted, expired = done
        if metrics.reporter():  # the total is every worker's: reported once
            metrics.CACHE_SIZE.set(total)
        if evicted:
            metrics.CACHE_EVICTIONS.labels("size").inc(evicted)
        if expired:
            metrics.CACHE_EVICTIONS.labels("expired").inc(expired)
        return True

    def health(self) -> dict[str, Any]:
        """For ``/readyz``: ``ok``, or ``unreachable`` with the error and since when."""
        return self.link.health()

    async def close(self) -> None:
        """Close the connections."""
        await self.link.close()
