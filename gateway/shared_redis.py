"""The bus of :mod:`breakers.shared` on Redis: provider state shared by every gateway
replica that points at the same Redis (``REDIS_URL``), through ``redis.asyncio``.

* Messages go out on one pub/sub channel, in the order they were sent, from a bounded
  outbox drained by one task (batched in a pipeline), so that publishing never waits.
  While Redis is unreachable they are dropped and counted: each replica then keeps its
  own state, and on rejoining says ``hello`` so that the others tell it what they know.
* Leases (one half-open trial, one probe per interval) are a Lua ``SET NX PX``, answered
  with the time the other holder still has, and given back with a compare-and-delete.
* A listener task keeps the subscription, and reconnects every ``redis_retry`` seconds
  when it drops; it pings a silent connection so that a dead one is noticed.

No command waits longer than ``redis_timeout``; :mod:`gateway.redis_link` falls back and
says so in ``/readyz`` and ``gateway_shared_state_up``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from breakers.shared import Message, Sharing
from gateway import metrics
from gateway.config import SharingSettings
from gateway.redis_link import ERRORS, RedisLink

log = logging.getLogger("gateway")

PREFIX = "gwshare:{v1}:"  # the braces: one hash slot for every key (Redis Cluster)
CHANNEL = PREFIX + "events"
_OUTBOX = 1024  # messages waiting to go out; more are dropped (and counted)
_BATCH = 64  # messages sent in one pipeline
_MAX_MESSAGE = 64 * 1024  # a larger message on the channel is not ours: ignored
_PING_AFTER = 5.0  # seconds of silence on the subscription before a ping
_POOL_SIZE = 16

# KEYS: the lease. ARGV: token, ttl (ms). 0 when taken, else the holder's ms left.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local left = redis.call('PTTL', KEYS[1])
if left < 1 then return 1 end
return left
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def replica_id() -> str:
    """This process among the replicas: its host, pid and a random part (pids repeat
    across containers)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{os.urandom(3).hex()}"


class RedisBus:
    """Pub/sub and leases in Redis for :class:`breakers.shared.Sharing`."""

    name = "redis"

    def __init__(self, settings: SharingSettings, replica: str | None = None) -> None:
        url = settings.redis_url
        assert url is not None
        self.replica = replica or replica_id()
        # (what, how to add it to a pipeline): sent in order, in the background.
        self._outbox: asyncio.Queue[tuple[str, Callable[[Any], Any]]] = asyncio.Queue(_OUTBOX)
        self._sharing: Sharing | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = False
        self._retry = settings.redis_retry
        self._timeout = settings.redis_timeout
        self.link = RedisLink(
            url,
            settings.redis_timeout,
            settings.redis_retry,
            purpose="sharing",
            fallback="each gateway keeps its own provider state and limits",
            on_up=self._on_up,
            on_error=lambda op: metrics.SHARED_ERRORS.labels(op).inc(),
            pool_size=_POOL_SIZE,
        )
        client = self.link.client
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)

    # -- the Bus protocol -----------------------------------------------------------

    def publish(self, message: Message) -> None:
        """Queue ``message`` for the channel; dropped while Redis is unreachable."""
        data = orjson.dumps(message)
        self.queue("pub", lambda pipe: pipe.publish(CHANNEL, data))

    async def claim(self, key: str, token: str, ttl: float) -> float | None:
        """Take the lease ``key`` for ``ttl`` seconds (see :class:`breakers.shared.Bus`)."""
        if not self._subscribed:  # not hearing the others: decide alone
            return None
        ms = max(1, int(ttl * 1000))
        left = await self.link.run("claim", self._claim, [PREFIX + key], [token, ms])
        return None if left is None else int(left) / 1000

    def release(self, key: str, token: str) -> None:
        """Give the lease back in the background, if ``token`` still holds it."""
        self.queue_script("release", self._release, [PREFIX + key], [token])

    # -- running ----------------------------------------------------------------------

    def start(self, sharing: Sharing) -> None:
        """Start listening and sending for ``sharing``."""
        self._sharing = sharing
        self._tasks = [
            asyncio.create_task(self._listen(), name="shared-listen"),
            asyncio.create_task(self._send(), name="shared-send"),
        ]

    async def close(self) -> None:
        """Stop the tasks and close the connections."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.link.close()

    @property
    def up(self) -> bool:
        """True while messages reach the others both ways."""
        return self._subscribed and self.link.up

    def health(self) -> dict[str, Any]:
        """For ``/readyz``: ``ok``, or ``unreachable`` with the error and since when."""
        health = self.link.health()
        if health["status"] == "ok" and not self._subscribed:
            health = {**health, "status": "connecting"}
        return health

    def queue_script(self, what: str, script: Any, keys: list[str], args: list[Any]) -> bool:
        """Run ``script`` (registered on the link's client) in the background, in order."""

        def add(pipe: Any) -> None:
            pipe.scripts.add(script)  # loaded before the batch runs, if Redis lacks it
            pipe.evalsha(script.sha, len(keys), *keys, *args)

        return self.queue(what, add)

    def queue(self, what: str, add: Callable[[Any], Any]) -> bool:
        """Send a command in the background, in order: ``add(pipeline)`` adds it to the
        next batch. False when it was dropped (Redis unreachable, or the outbox full)."""
        # Not while unsubscribed (nobody is listening); after a failed command the sender
        # skips them for redis_retry seconds, then tries again: that is how it recovers.
        if self._subscribed:
            try:
                self._outbox.put_nowait((what, add))
                return True
            except asyncio.QueueFull:
                pass
        if what == "pub":
            metrics.SHARED_MESSAGES.labels("dropped").inc()
        else:
            metrics.SHARED_ERRORS.labels(what).inc()
        return False

    def _on_up(self, up: bool) -> None:
        metrics.SHARED_UP.set(1 if up and self._subscribed else 0)
        if up and self._subscribed and self._sharing is not None:
            self._sharing.joined()  # back after failed commands: catch up both ways

    async def _send(self) -> None:
        """Send the outbox in order, a pipeline of up to :data:`_BATCH` at a time."""
        client = self.link.client
        while True:
            batch = [await self._outbox.get()]
            while len(batch) < _BATCH and not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            pipe = client.pipeline(transaction=False)
            for _, add in batch:
                add(pipe)
            sent = await self.link.call("send", pipe.execute)
            outcome = "sent" if sent is not None else "dropped"
            metrics.SHARED_MESSAGES.labels(outcome).inc(sum(what == "pub" for what, _ in batch))

    async def _listen(self) -> None:
        """Keep the subscription; hand every message to the sharing."""
        assert self._sharing is not None
        client = redis.Redis.from_url(
            self.link.url,
            socket_connect_timeout=self._timeout,
            socket_timeout=None,  # a subscription is silent for as long as nothing happens
            retry=Retry(NoBackoff(), 0),
        )
        try:
            while True:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                try:
                    async with asyncio.timeout(self._timeout):
                        await pubsub.subscribe(CHANNEL)
                    if not self.link.up:  # back: the pooled connections died with it
                        await self.link.client.connection_pool.disconnect()
                    self.link.answered()
                    self._subscribed = True
                    metrics.SHARED_UP.set(1)
                    self._sharing.joined()
                    await self._receive(pubsub)
                except ERRORS as e:
                    self.link.failed("subscribe", e)
                finally:
                    self._subscribed = False
                    with contextlib.suppress(*ERRORS):
                        await pubsub.aclose()
                await asyncio.sleep(self._retry)
        finally:
            await client.aclose()

    async def _receive(self, pubsub: Any) -> None:
        """Apply messages until the connection fails (raises)."""
        assert self._sharing is not None
        pinged = False
        while True:
            message = await pubsub.get_message(timeout=_PING_AFTER)
            if message is None:
                if pinged:  # a ping went unanswered for a whole period: gone
                    raise TimeoutError("no answer to a ping on the subscription")
                await pubsub.ping()
                pinged = True
                continue
            pinged = False
            if message.get("type") != "message":
                continue  # a pong
            data = message.get("data")
            if not isinstance(data, bytes) or len(data) > _MAX_MESSAGE:
                metrics.SHARED_MESSAGES.labels("dropped").inc()
                continue
            try:
                decoded = orjson.loads(data)
            except orjson.JSONDecodeError:
                metrics.SHARED_MESSAGES.labels("dropped").inc()
                continue
            applied = self._sharing.receive(decoded)
            if applied is not None:
                metrics.SHARED_MESSAGES.labels("received" if applied else "dropped").inc()
