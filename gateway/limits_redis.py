"""A provider's configured limits counted across every replica, in Redis: its
``max_concurrency`` and its ``rpm``/``tpm`` budget, with the same queue-then-overflow
behaviour as the local limits (:mod:`gateway.limits`).

One Lua script admits a request atomically: it counts the slots held by live replicas
(each replica's count in a hash, dropped when the replica's liveness key, refreshed
every second, expires: a replica that dies frees its slots within seconds), refills the
token buckets on Redis's clock exactly as :class:`gateway.budgets.Bucket` does, and takes
a slot, a request and the estimated tokens, or says what held it back (``slot`` or
``budget``) and, for the budget, when it will have refilled. Releases, refunds and the
corrections from ``usage`` go out in the background through the bus's ordered outbox.

Each replica keeps its own first-come line: only the first in line asks Redis, again
when a slot is freed here, after a short pause when a slot is held elsewhere, or when
the budget will have refilled. A request that cannot be admitted within
``max_queue_wait`` moves on to the next provider, as locally.

Costs: a provider with a shared limit pays one Redis round trip per admission (a
provider without one pays nothing). While Redis is unreachable each replica falls back
to the local limits with its own share (the configured values, divided among the workers
of its machine); requests waiting in a shared line at that moment move on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gateway import metrics
from gateway.budgets import Bucket, Budget, now, per_minute
from gateway.config import ProviderConfig
from gateway.limits import Limiter, share_of
from gateway.shared_redis import PREFIX, RedisBus

if TYPE_CHECKING:
    from gateway.upstream import Provider

log = logging.getLogger("gateway")

_ALIVE = PREFIX + "alive:"  # + replica: exists while the replica lives
_ALIVE_MS = 5000
_HEARTBEAT = 1.0
_SLOT_POLL = 0.01  # seconds between two asks while a slot is held by another replica
# Slots freed here are told to Redis with the next admission, or after this long alone.
_RELEASE_DELAY = 0.005
_KINDS = ("requests", "tokens")

# Shared by the scripts: the time on Redis's clock, and a bucket's refill, as in
# gateway.budgets.Bucket (level l, stamp s, held until h; absent: full).
_BUCKETS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function refill(k, rate, cap)
  local l = tonumber(redis.call('HGET', KEYS[1], k .. 'l'))
  if not l then return cap, 0 end
  local s = tonumber(redis.call('HGET', KEYS[1], k .. 's'))
  local h = tonumber(redis.call('HGET', KEYS[1], k .. 'h') or '0')
  if h > now then return cap, h - now end
  if h > 0 then l, s = cap, h end
  if now > s then l = math.min(cap, l + (now - s) * rate) end
  return l, 0
end
local function store(k, l, h)
  redis.call('HSET', KEYS[1], k .. 'l', tostring(l), k .. 's', tostring(now), k .. 'h', tostring(h))
  redis.call('PEXPIRE', KEYS[1], 3600000)
end
"""

# KEYS: buckets, slots. ARGV: replica, alive prefix, max concurrency, request rate and
# capacity, token rate and capacity, tokens, liveness (ms), slots it released since it
# last said (carried here rather than sent alone). The replica asking is alive.
# Returns {admitted, wait, blocker, request level, token level}.
_ADMIT = (
    _BUCKETS
    + """
redis.call('SET', ARGV[2] .. ARGV[1], 1, 'PX', ARGV[9])
local released = tonumber(ARGV[10])
if released > 0 and redis.call('HINCRBY', KEYS[2], ARGV[1], -released) < 0 then
  redis.call('HSET', KEYS[2], ARGV[1], 0)
end
local max = tonumber(ARGV[3])
local used = 0
if max > 0 then
  local held = redis.call('HGETALL', KEYS[2])
  for i = 1, #held, 2 do
    if redis.call('EXISTS', ARGV[2] .. held[i]) == 1 then
      used = used + tonumber(held[i + 1])
    else
      redis.call('HDEL', KEYS[2], held[i])
    end
  end
end
local rates = {{'r', tonumber(ARGV[4]), tonumber(ARGV[5]), 1},
               {'t', tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])}}
local levels, wait = {}, 0
for i, b in ipairs(rates) do
  if b[2] > 0 then
    local l, held = refill(b[1], b[2], b[3])
    local short = math.min(b[4], b[3]) - l
    local w = held
    if short > 0.000000001 then w = held + short / b[2] end
    if w > wait then wait = w end
    levels[i] = l
  end
end
local shown = {tostring(levels[1] or ''), tostring(levels[2] or '')}
if max > 0 and used >= max then return {0, '0', 'slot', shown[1], shown[2]} end
if wait > 0 then return {0, tostring(wait), 'budget', shown[1], shown[2]} end
for i, b in ipairs(rates) do
  if b[2] > 0 then
    levels[i] = levels[i] - b[4]
    store(b[1], levels[i], 0)
  end
end
if max > 0 then redis.call('HINCRBY', KEYS[2], ARGV[1], 1) end
return {1, '0', '', tostring(levels[1] or ''), tostring(levels[2] or '')}
"""
)

# KEYS: buckets. ARGV: request rate, capacity, given back; token rate, capacity, given
# back (negative: taken). A refund, a retry's charge, a correction from usage.
_ADJUST = (
    _BUCKETS
    + """
local rates = {{'r', tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])},
               {'t', tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])}}
for _, b in ipairs(rates) do
  if b[2] > 0 and b[4] ~= 0 then
    local l, held = refill(b[1], b[2], b[3])
    if held == 0 then store(b[1], math.min(b[3], l + b[4]), 0) end
  end
end
return 1
"""
)

# KEYS: buckets. ARGV: kind (r or t), rate, capacity, remaining, reset (s, 0: none). What
# the upstream's x-ratelimit-* headers say: they only ever lower what is left.
_OBSERVE = (
    _BUCKETS
    + """
local rate, cap = tonumber(ARGV[2]), tonumber(ARGV[3])
local remaining, reset = tonumber(ARGV[4]), tonumber(ARGV[5])
local l, held = refill(ARGV[1], rate, cap)
if held > 0 then return 0 end
local h = 0
if remaining < l then l = remaining end
if remaining < 1 and reset > 0 then
  if l > 0 then l = 0 end
  h = now + reset
end
store(ARGV[1], l, h)
return 1
"""
)

# KEYS: slots. ARGV: replica, count (a release: -1; a resync: the count, absolute).
_SLOTS = """
if ARGV[3] == 'set' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return tonumber(ARGV[2])
end
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], tonumber(ARGV[2]))
if n < 0 then redis.call('HSET', KEYS[1], ARGV[1], 0) end
return n
"""


def _keys(provider: str) -> tuple[str, str]:
    return f"{PREFIX}budget:{provider}", f"{PREFIX}slots:{provider}"


class RedisLimits:
    """The scripts, the liveness of this replica, and its limited providers."""

    def __init__(self, bus: RedisBus) -> None:
        self.bus = bus
        self.link = bus.link
        client = self.link.client
        self._admit = client.register_script(_ADMIT)
        self._adjust = client.register_script(_ADJUST)
        self._observe = client.register_script(_OBSERVE)
        self._slots = client.register_script(_SLOTS)
        self.limiters: dict[str, SharedLimiter] = {}
        self._task: asyncio.Task[None] | None = None
        self._alive_key = _ALIVE + bus.replica

    @property
    def up(self) -> bool:
        """True while the limits are counted in Redis."""
        return self.bus.up

    def start(self) -> None:
        """Keep this replica alive in Redis (its slots count only while it is)."""
        self._task = asyncio.create_task(self._heartbeat(), name="shared-limits")

    async def close(self) -> None:
        """Stop the heartbeat; the slots this replica held expire with its liveness."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _heartbeat(self) -> None:
        was_up = False
        while True:
            up = self.up
            if up:
                self.bus.queue("alive", lambda pipe: pipe.set(self._alive_key, 1, px=_ALIVE_MS))
                if not was_up:  # (re)joined: what this replica holds now is the truth
                    for limiter in self.limiters.values():
                        limiter.resync()
            was_up = up
            await asyncio.sleep(_HEARTBEAT)

    async def admit(self, limiter: SharedLimiter, tokens: int, released: int) -> list[Any] | None:
        """Ask Redis to admit one request of ``tokens`` for ``limiter``'s provider, telling
        it of ``released`` slots freed here meanwhile."""
        r, t = limiter.budget.global_buckets
        args = [
            self.bus.replica,
            _ALIVE,
            limiter.shared_max,
            r.rate if r else 0,
            r.capacity if r else 0,
            t.rate if t else 0,
            t.capacity if t else 0,
            tokens,
            _ALIVE_MS,
            released,
        ]
        return await self.link.run("admit", self._admit, list(_keys(limiter.name)), args)

    def slots(self, provider: str, count: int, absolute: bool = False) -> None:
        """Release slots (``count`` negative), or set this replica's count (``absolute``)."""
        keys = [_keys(provider)[1]]
        args = [self.bus.replica, count, "set" if absolute else "add"]
        self.bus.queue_script("release", self._slots, keys, args)

    def adjust(self, budget: SharedBudget, requests: int, tokens: int) -> None:
        """Give back (or take, negative) requests and tokens on the shared buckets."""
        r, t = budget.global_buckets
        keys = [_keys(budget.name)[0]]
        args = [
            r.rate if r else 0,
            r.capacity if r else 0,
            requests if r else 0,
            t.rate if t else 0,
            t.capacity if t else 0,
            tokens if t else 0,
        ]
        self.bus.queue_script("adjust", self._adjust, keys, args)

    def observe(self, budget: SharedBudget, kind: str, remaining: float, reset: float) -> None:
        """The upstream says ``remaining`` are left, whole again in ``reset`` seconds."""
        bucket = budget.global_buckets[_KINDS.index(kind)]
        assert bucket is not None
        keys = [_keys(budget.name)[0]]
        args = [kind[0], bucket.rate, bucket.capacity, remaining, reset]
        self.bus.queue_script("observe", self._observe, keys, args)


class SharedBudget(Budget):
    """A provider's configured budget counted in Redis, across replicas.

    The inherited buckets are this process's share, used while Redis is unreachable (and
    for what is learned from headers beyond the configuration). :attr:`global_buckets`
    mirror the shared buckets as Redis last described them, refilled locally between
    answers: for waits, ``/admin/providers`` and the gauge, never for admission.
    """

    __slots__ = ("global_buckets", "limits")

    def __init__(self, config: ProviderConfig, share: float, limits: RedisLimits) -> None:
        self.limits = limits  # first: the gauge reads it as soon as a bucket exists
        at = now()
        self.global_buckets = (
            per_minute(config.rpm, config.burst_seconds, at) if config.rpm else None,
            per_minute(config.tpm, config.burst_seconds, at) if config.tpm else None,
        )
        super().__init__(
            config.name,
            config.rpm * share,
            config.tpm * share,
            config.burst_seconds,
            config.quota_reset_timeout,
        )

    def _activate(self, kind: str) -> None:
        self.active = True
        if metrics.reporter() or not self._fixed[kind]:  # a shared level: one worker tells
            child = metrics.BUDGET_REMAINING.labels(self.name, kind)
            metrics.gauge_function(child, lambda: self.remaining(kind))

    def _shared(self, kind: str) -> Bucket | None:
        """The shared bucket of ``kind`` while Redis counts it, else None."""
        if not self.limits.up:
            return None
        return self.global_buckets[_KINDS.index(kind)]

    def mirror(self, levels: list[Any]) -> None:
        """Take the shared levels from an admission's answer."""
        at = now()
        for bucket, level in zip(self.global_buckets, levels, strict=True):
            if bucket is not None and level not in (b"", ""):
                bucket.level, bucket.stamp, bucket.hold_until = float(level), at, 0.0

    def remaining(self, kind: str) -> float:
        """What the ``kind`` bucket holds now: the shared one while Redis counts it."""
        bucket = self._shared(kind)
        if bucket is None:
            return super().remaining(kind)
        return bucket.refill(now())

    def wait(self, tokens: int, at: float, ahead: int = 0, ahead_tokens: int = 0) -> float:
        """Seconds until one request of ``tokens`` fits (the shared budget as last seen)."""
        r, t = self._shared("requests"), self._shared("tokens")
        if r is None and t is None:
            return super().wait(tokens, at, ahead, ahead_tokens)
        wait = r.wait(1, at, ahead) if r is not None else 0.0
        return max(wait, t.wait(tokens, at, ahead_tokens)) if t is not None else wait

    def charge(self, tokens: int, at: float) -> None:
        """Take one request of ``tokens`` (a retry): from the shared budget when counted."""
        if not self.limits.up:
            super().charge(tokens, at)
            return
        for bucket, amount in zip(self.global_buckets, (1, tokens), strict=True):
            if bucket is not None:
                bucket.take(amount, at)
        self.limits.adjust(self, -1, -tokens)

    def refund(self, tokens: int) -> None:
        """Give back a request that was never sent."""
        if not self.limits.up:
            super().refund(tokens)
            return
        self.limits.adjust(self, 1, tokens)

    def correct(self, surplus: int) -> None:
        """The answer used ``surplus`` tokens fewer than charged (negative: more)."""
        if not self.limits.up:
            super().correct(surplus)
            return
        if self.global_buckets[1] is not None and surplus:
            self.limits.adjust(self, 0, surplus)

    def learn(self, headers: Mapping[str, str], tell: bool = True) -> None:
        """Learn as a local budget does; what the upstream says is left of a configured
        budget also lowers the shared bucket (only when it is less than it holds)."""
        super().learn(headers, tell)
        if not tell or not self.limits.up:
            return  # learned from another replica: that one told Redis
        for kind, bucket in zip(_KINDS, self.global_buckets, strict=True):
            text = headers.get(f"x-ratelimit-remaining-{kind}")
            if bucket is None or text is None:
                continue
            try:
                remaining = float(text)
            except ValueError:
                continue
            if 0 <= remaining < bucket.refill(now()):
                local: Bucket | None = getattr(self, kind)
                reset = max(0.0, local.hold_until - now()) if local is not None else 0.0
                bucket.observe(remaining, reset or None, now())
                self.limits.observe(self, kind, remaining, reset)

    def report(self) -> dict[str, Any] | None:
        """The budgets for ``/admin/providers``: the shared ones while Redis counts them."""
        out = super().report()
        if out is None or not self.limits.up:
            return out
        at = now()
        for kind, bucket in zip(_KINDS, self.global_buckets, strict=True):
            if bucket is not None:
                out[kind] = {**bucket.report(at), "source": "configured, shared"}
        return out


class SharedLimiter(Limiter):
    """A provider's concurrency limit and budget counted in Redis, with a local line.

    The inherited :class:`~gateway.limits.Limiter` (this process's share) decides while
    Redis is unreachable.
    """

    __slots__ = (
        "_line",
        "_poked",
        "_pump",
        "_refill_at",
        "_unsent",
        "blocked",
        "limits",
        "name",
        "redis_held",
        "shared_max",
    )

    def __init__(
        self,
        config: ProviderConfig,
        local_max: int,
        budget: SharedBudget,
        limits: RedisLimits,
    ) -> None:
        super().__init__(local_max, config.max_queue, budget)
        self.budget: SharedBudget = budget
        self.name = config.name
        self.shared_max = config.max_concurrency
        self.limits = limits
        self.redis_held = 0  # slots of this process counted in Redis
        self.blocked = ""  # what held the last refusal back: "slot" or "budget"
        self._refill_at = 0.0  # loop time the shared budget will admit again (last seen)
        self._line: deque[tuple[asyncio.Future[bool], int]] = deque()
        self._pump: asyncio.Task[None] | None = None
        self._poked: asyncio.Event | None = None
        self._unsent = 0  # slots freed here that Redis has not been told of yet

    @property
    def queued(self) -> int:
        """Requests waiting here for a shared or a local admission."""
        return len(self._line) + len(self._waiters)

    def slot_free(self) -> bool:
        """Whether a slot is free, as far as the last shared answer tells: without a
        budget only a slot can hold a request back; with both, whichever held the last."""
        if not self.limits.up:
            return super().slot_free()
        if not self.shared_max:
            return True
        return self.budget.active and self.blocked != "slot"

    def budget_wait(self, tokens: int) -> float:
        """Seconds until the shared budget admits again, as its last refusal said."""
        if not self.limits.up:
            return super().budget_wait(tokens)
        return max(0.0, self._refill_at - asyncio.get_running_loop().time())

    def try_acquire(self, tokens: int = 0) -> bool:
        """Locally only while Redis is unreachable: a shared admission is awaited."""
        return False if self.limits.up else super().try_acquire(tokens)

    async def acquire(self, wait: float, tokens: int = 0) -> bool:
        """Admit one request of ``tokens``, waiting up to ``wait`` seconds in line."""
        if not self.limits.up:
            return await super().acquire(wait, tokens)
        if not self._line:  # nobody ahead: ask at once
            got = await self._ask(tokens)
            if got is None:
                return await super().acquire(wait, tokens)
            if got:
                return True
            if wait <= 0 or self.budget_wait(tokens) > wait:
                return False
        if len(self._line) >= self._max_queue:
            return False
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        entry = (future, tokens)
        self._line.append(entry)
        self._poke()
        try:
            async with asyncio.timeout(wait):
                return await future
        except TimeoutError:
            return future.done() and not future.cancelled() and future.result()
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.result():
                self._give_back(tokens)  # admitted just as the client left
            raise
        finally:
            if not future.done():
                future.cancel()
            if entry in self._line:
                self._line.remove(entry)

    async def _ask(self, tokens: int) -> bool | None:
        """One shared admission: True, False (held back), None (Redis unreachable)."""
        released, self._unsent = self._unsent, 0
        answer = await self.limits.admit(self, tokens, released)
        if not isinstance(answer, list) or len(answer) != 5:
            return None  # (the releases are counted again when Redis is back: resync)
        admitted, wait, blocker, *levels = answer
        self.budget.mirror(levels)
        if admitted == 1:
            self.in_use += 1
            self.redis_held += 1
            return True
        self.blocked = blocker.decode() if isinstance(blocker, bytes) else str(blocker)
        if self.blocked == "budget":
            self._refill_at = asyncio.get_running_loop().time() + float(wait)
        return False

    def _poke(self) -> None:
        if self._pump is None or self._pump.done():
            self._poked = asyncio.Event()
            self._pump = asyncio.create_task(self._serve_line(), name=f"line-{self.name}")
        elif self._poked is not None:
            self._poked.set()

    async def _serve_line(self) -> None:
        """Ask for the first in line until the line is empty."""
        line, poked = self._line, self._poked
        assert poked is not None
        while line:
            future, tokens = line[0]
            if future.done():
                line.popleft()
                continue
            got = await self._ask(tokens)
            if got is None:  # Redis went away: those waiting move on
                for waiting, _ in line:
                    if not waiting.done():
                        waiting.set_result(False)
                line.clear()
                return
            if got:
                if future.done():  # left while asked for: the slot goes back
                    self._give_back(tokens)
                else:
                    future.set_result(True)
                if line and line[0][0] is future:
                    line.popleft()
                continue
            pause = self.budget_wait(tokens) if self.blocked == "budget" else _SLOT_POLL
            poked.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(pause, 0.001)):
                    await poked.wait()

    def release(self) -> None:
        """Give a slot back: to Redis when it counted it; the line may go on."""
        self.in_use -= 1
        if self.redis_held > 0:
            self.redis_held -= 1
            if self.shared_max:
                self._unsent += 1
                if self._unsent == 1:  # told with the next admission, or alone soon
                    loop = asyncio.get_running_loop()
                    loop.call_later(_RELEASE_DELAY, self._send_releases)
        if self._line:
            self._poke()
        if self._waiters:
            self._wake()

    def _send_releases(self) -> None:
        released, self._unsent = self._unsent, 0
        if released:
            self.limits.slots(self.name, -released)

    def resync(self) -> None:
        """Redis (re)joined: every request in flight here now counts there."""
        self.redis_held, self._unsent = self.in_use, 0
        if self.shared_max:
            self.limits.slots(self.name, self.in_use, absolute=True)


def share_limits(bus: RedisBus, providers: Mapping[str, Provider]) -> RedisLimits | None:
    """Count the configured limits of ``providers`` across replicas in Redis; None when
    no provider has one."""
    limited = [
        p for p in providers.values() if p.config.max_concurrency or p.config.rpm or p.config.tpm
    ]
    if not limited:
        return None
    limits = RedisLimits(bus)
    for provider in limited:
        cfg = provider.config
        budget = SharedBudget(cfg, 1 / provider.workers, limits)
        limiter = SharedLimiter(
            cfg, share_of(cfg.max_concurrency, provider.workers), budget, limits
        )
        provider.budget, provider.limiter = budget, limiter
        limits.limiters[provider.name] = limiter
    return limits
