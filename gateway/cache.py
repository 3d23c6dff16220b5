"""The response cache: which requests may use it, their keys, and the in-memory store.

A request uses the cache only when asked: by the client, with ``x-gateway-cache: use``
(look up, else go upstream and store), ``refresh`` (go upstream and store) or ``skip``;
or by the operator, for a model or alias under ``[cache.models]``. A rule of the operator
caches deterministic requests only (``temperature`` set to 0; embeddings), unless it says
``always``: a sampled answer (``temperature`` above 0, or unset, which means 1) is a draw,
and replaying one draw is right only when someone asked for it explicitly. The client's
header is such an explicit request.

The key is a SHA-256 of the canonical request: the endpoint, the routes the model
resolves to (alias and routing applied: provider and upstream model, in order), and every
body field but ``model``, ``stream`` and ``stream_options`` (which shape the framing, not
the answer); never the API key or the request id. With ``GATEWAY_API_KEYS`` set, the
digest of the client's key is part of it unless ``[cache] shared = true``, so one tenant's
``hit`` cannot tell what another asked.

Stored are complete answers only: a 200 whose every choice finished, for a reason other
than ``content_filter``, and without a refusal; a stream that ended complete (every
choice finished, ``[DONE]``), with no event dropped. An entry keeps the bytes the client
got, so a hit is replayed byte for byte (``id`` and ``created`` included).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from gateway import metrics
from gateway.config import CacheSettings
from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.routing import Route
    from gateway.upstream import Provider

HEADER = "x-gateway-cache"
TTL_HEADER = "x-gateway-cache-ttl"
_MODES = ("use", "skip", "refresh")
# Body fields that do not change the answer (how it is framed), and the model, which the
# key names by its routes instead.
_NOT_IN_KEY = frozenset({"model", "stream", "stream_options"})
_KEY_VERSION = 1  # bump when the key's material changes: old entries then simply miss
# What an entry costs besides its body and key (its bookkeeping), for the byte bound.
ENTRY_OVERHEAD = 160
_MAGIC = b"gwc1\n"
# A streamed choice that a content filter stopped, and a refusal (a non-null string).
_FILTERED = re.compile(rb'"finish_reason"\s*:\s*"content_filter"')
_REFUSED = re.compile(rb'"refusal"\s*:\s*"')


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored answer: ``json`` (a complete body) or ``sse`` (a stream's bytes)."""

    kind: str
    body: bytes
    provider: str  # who produced it
    created: float  # Unix time it was stored

    def encode(self) -> bytes:
        """The entry as bytes (for Redis): a versioned header line, then the body."""
        meta = {"kind": self.kind, "provider": self.provider, "created": self.created}
        return _MAGIC + orjson.dumps(meta) + b"\n" + self.body

    @classmethod
    def decode(cls, data: bytes) -> Entry:
        """The entry ``encode`` wrote; ValueError for anything else."""
        if not data.startswith(_MAGIC):
            raise ValueError("not a cache entry")
        head, sep, body = data[len(_MAGIC) :].partition(b"\n")
        meta = orjson.loads(head) if sep else None
        if not isinstance(meta, dict) or meta.get("kind") not in ("json", "sse"):
            raise ValueError("not a cache entry")
        provider, created = meta.get("provider"), meta.get("created")
        if not isinstance(provider, str) or not isinstance(created, int | float):
            raise ValueError("not a cache entry")
        return cls(meta["kind"], body, provider, float(created))


@dataclass(frozen=True, slots=True)
class Plan:
    """What the cache does for one request."""

    key: str  # "" when it bypasses the cache
    lookup: bool  # False for refresh: go upstream, then store
    ttl: float

    @property
    def bypass(self) -> bool:
        """True when the request neither reads nor fills the cache."""
        return not self.key


_BYPASS = Plan("", False, 0.0)


class Backend(Protocol):
    """Where entries live: in memory, or in Redis (``gateway.cache_redis``)."""

    name: str

    async def get(self, key: str) -> Entry | None:
        """The live entry under ``key``, or None (missing, expired or unreachable)."""

    async def set(self, key: str, entry: Entry, ttl: float) -> bool:
        """Store ``entry`` for ``ttl`` seconds, evicting to stay within the bounds; False
        when it was not stored (larger than the whole cache, or the backend failed)."""

    def health(self) -> dict[str, Any]:
        """For ``/readyz``: the backend and whether it answers."""

    async def close(self) -> None:
        """Release connections."""


def request_key(call: Call, routes: Sequence[Route[Provider]], partition: str) -> str:
    """The cache key of ``call``: see the module's docstring for what goes in."""
    rest = {k: v for k, v in call.body.items() if k not in _NOT_IN_KEY}
    chain = [[r.provider.name, r.model] for r in routes]
    material = [_KEY_VERSION, call.endpoint, partition, chain, rest]
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


def sampled(call: Call) -> bool:
    """True when the answer is a random draw: ``temperature`` unset (1) or above 0."""
    if call.endpoint == "embeddings":
        return False
    temperature = call.body.get("temperature")
    deterministic = type(temperature) in (int, float) and temperature == 0
    return not deterministic


def storable(kind: str, body: bytes, endpoint: str) -> bool:
    """True when ``body`` is a complete answer worth replaying (see the module's docstring).

    A stream (``sse``) comes from the relay, whose stream state has judged every event:
    it is complete, with no event dropped. What is left to see is a filtered or refused
    answer, found in its bytes (folding the stream costs as much as relaying it again);
    a text that merely mentions these words is JSON-escaped, so it does not match.
    """
    if kind == "sse":
        if b"content_filter" in body and _FILTERED.search(body):  # `in` first: faster
            return False
        return not (b'"refusal"' in body and _REFUSED.search(body))
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(answer, dict):
        return False
    if endpoint == "embeddings":
        return isinstance(answer.get("data"), list)
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            return False
        finish = choice.get("finish_reason")
        if not isinstance(finish, str) or not finish or finish == "content_filter":
            return False
        message = choice.get("message")
        if isinstance(message, dict) and message.get("refusal"):
            return False
    return True


class MemoryBackend:
    """An LRU map bounded by entries and bytes, with a TTL per entry."""

    name = "memory"

    def __init__(
        self, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """``clock`` tells the time that TTLs count in (tests pass their own)."""
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, Entry, int]] = OrderedDict()
        self.bytes = 0

    def keys(self) -> list[str]:
        """The stored keys, least recently used first."""
        return list(self._items)

    async def get(self, key: str) -> Entry | None:
        """The live entry under ``key`` (now the most recently used), or None."""
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= self._clock():
            self._drop(key, "expired")
            return None
        self._items.move_to_end(key)
        return item[1]

    async def set(self, key: str, entry: Entry, ttl: float) -> bool:
        """Store ``entry``; the least recently used entries go to make room."""
        size = len(entry.body) + len(key) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return False
        if key in self._items:
            self._drop(key, None)
        self._items[key] = (self._clock() + ttl, entry, size)
        self.bytes += size
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            oldest = next(iter(self._items))
            expired = self._items[oldest][0] <= self._clock()
            self._drop(oldest, "expired" if expired else "size")
        metrics.CACHE_SIZE.set(self.bytes)
        return True

    def _drop(self, key: str, reason: str | None) -> None:
        _, _, size = self._items.pop(key)
        self.bytes -= size
        if reason is not None:
            metrics.CACHE_EVICTIONS.labels(reason).inc()
        metrics.CACHE_SIZE.set(self.bytes)

    def health(self) -> dict[str, Any]:
        """The in-memory cache always answers."""
        return {"backend": self.name, "status": "ok", "entries": len(self._items)}

    async def close(self) -> None:
        """Nothing to release."""


class Cache:
    """The opt-in rules and the backend, as the request path uses them."""

    def __init__(self, settings: CacheSettings, backend: Backend, partitioned: bool) -> None:
        """``partitioned``: client keys are configured and the cache is not ``shared``."""
        self.settings = settings
        self.backend = backend
        self.partitioned = partitioned

    def plan(
        self,
        headers: Mapping[str, str],
        call: Call,
        routes: Sequence[Route[Provider]],
        client: str,
    ) -> Plan | None:
        """What to do for ``call``: None when nobody asked for the cache. ``client`` is
        the digest of the client's key ("" without keys). Bad headers raise a 400."""
        given = headers.get(HEADER)
        if given is None:
            rule = self.settings.models.get(call.model)
            if rule is None:
                return None
            mode, explicit = "use", rule == "always"
        else:
            mode = given.strip().lower()
            if mode not in _MODES:
                raise GatewayError(
                    400,
                    f"{HEADER} must be one of: {', '.join(_MODES)}.",
                    code="invalid_cache_mode",
                )
            explicit = True
        ttl = self._ttl(headers.get(TTL_HEADER))
        if mode == "skip" or (not explicit and sampled(call)):
            return _BYPASS
        partition = client if self.partitioned else ""
        return Plan(request_key(call, routes, partition), mode == "use", ttl)

    def _ttl(self, given: str | None) -> float:
        if given is None:
            return self.settings.ttl
        try:
            ttl = float(given)
        except ValueError:
            ttl = -1.0
        most = self.settings.max_ttl
        if not 0 < ttl <= most:  # nan and inf fail too
            message = f"{TTL_HEADER} must be a number of seconds in (0, {most:g}]"
            raise GatewayError(400, message, code="invalid_cache_ttl")
        return ttl

    async def get(self, key: str) -> Entry | None:
        """The entry under ``key``, or None."""
        return await self.backend.get(key)

    async def put(self, key: str, entry: Entry, ttl: float, endpoint: str) -> bool:
        """Store ``entry`` if it is a complete answer (:func:`storable`) within
        ``max_entry_bytes``; True when it was stored."""
        if len(entry.body) > self.settings.max_entry_bytes:
            return False
        if not storable(entry.kind, entry.body, endpoint):
            return False
        if not await self.backend.set(key, entry, ttl):
            return False
        metrics.CACHE_BYTES.labels("stored").inc(len(entry.body))
        return True

    def health(self) -> dict[str, Any]:
        """For ``/readyz``."""
        return self.backend.health()

    async def close(self) -> None:
        """Release the backend."""
        await self.backend.close()
