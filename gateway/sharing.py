"""What gateway processes share about their providers, and through what.

With a Redis (``REDIS_URL``, ``[sharing] redis_url`` or the cache's) every process that
points at it is a replica on :class:`~gateway.shared_redis.RedisBus`; without one, the
workers of one ``--workers`` supervisor share through its hub
(:class:`~gateway.hub.HubBus`). A single process shares nothing and pays nothing.

:mod:`breakers.shared` shares the breakers (openings, failure counts, the one half-open
trial) and the probes (one process probes each provider per interval, the others apply
its results). This module adds what the gateway learns about rate limits: the
``x-ratelimit-*`` headers of an answer, which every process applies to its own budget as
if the answer had come to it (at most four times a second per provider, at once when a
budget is spent), and, with Redis, the providers' configured limits counted across every
replica (:mod:`gateway.limits_redis`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from breakers.shared import Bus, Message, Sharing
from gateway import metrics
from gateway.config import ProviderConfig, Settings

if TYPE_CHECKING:
    from gateway.limits_redis import RedisLimits
    from gateway.upstream import Provider

log = logging.getLogger("gateway")

#: The headers an answer's rate limits are learned from (gateway.budgets), as shared.
RATE_HEADERS = tuple(
    f"x-ratelimit-{part}-{kind}"
    for part in ("limit", "remaining", "reset")
    for kind in ("requests", "tokens")
)
_LEARN_EVERY = 0.25  # seconds between two shares of one provider's learned limits
_MAX_HEADER = 64  # characters of a shared header value


@dataclass(frozen=True, slots=True)
class Worker:
    """This process is worker ``index`` of ``count`` under a supervisor, which runs the
    hub at ``hub`` (None when the workers share through Redis)."""

    index: int
    count: int
    hub: str | None = None


class SharedBus(Bus, Protocol):
    """A bus this module can run: started, checked and closed."""

    name: str

    def start(self, sharing: Sharing) -> None:
        """Start delivering messages to ``sharing``."""

    async def close(self) -> None:
        """Stop."""

    def health(self) -> dict[str, Any]:
        """For ``/readyz``."""


def trial_ttl(config: ProviderConfig) -> float:
    """The longest a half-open trial may take: its lease lasts this long at most, so a
    process that dies mid-trial holds the others back no longer."""
    return config.connect_timeout + max(config.first_token_timeout, config.response_timeout)


class GatewaySharing:
    """The providers of this process on ``bus``."""

    def __init__(
        self, bus: SharedBus, providers: Mapping[str, Provider], limits: RedisLimits | None
    ) -> None:
        self.bus = bus
        self.providers = providers
        self.limits = limits
        self.sharing = Sharing(bus)
        self.sharing.handlers["rl"] = self._apply_learned
        self._pending: dict[str, dict[str, str]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        for provider in providers.values():
            provider.share = self.sharing.add(
                provider.name, provider.breaker, trial_ttl(provider.config)
            )
            provider.budget.on_learn = self._learned

    def start(self) -> None:
        """Connect the probers (started by now) and the bus."""
        for provider in self.providers.values():
            assert provider.share is not None
            provider.share.prober = provider.prober
        self.bus.start(self.sharing)
        if self.limits is not None:
            self.limits.start()

    async def close(self) -> None:
        """Stop sharing."""
        for timer in self._timers.values():
            timer.cancel()
        if self.limits is not None:
            await self.limits.close()
        await self.bus.close()

    def health(self) -> dict[str, Any]:
        """The bus's state for ``/readyz``."""
        return self.bus.health()

    def _learned(self, name: str, headers: Mapping[str, str]) -> None:
        """A budget here learned from an answer's headers: the others learn it too."""
        subset = {h: headers[h][:_MAX_HEADER] for h in RATE_HEADERS if h in headers}
        self._pending[name] = subset
        spent = any(
            _spent(subset.get(f"x-ratelimit-remaining-{kind}")) for kind in ("requests", "tokens")
        )
        if spent:  # everyone must hold off now, not in a quarter of a second
            self._flush(name)
        elif name not in self._timers:
            loop = asyncio.get_running_loop()
            self._timers[name] = loop.call_later(_LEARN_EVERY, self._flush, name)

    def _flush(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()
        subset = self._pending.pop(name, None)
        share = self.providers[name].share
        if subset and share is not None:
            share.publish("rl", h=subset)

    def _apply_learned(self, name: str, message: Message) -> None:
        headers = message.get("h")
        if not isinstance(headers, dict):
            raise ValueError("h is not an object")
        clean = {
            k: v[:_MAX_HEADER]
            for k, v in headers.items()
            if k in RATE_HEADERS and isinstance(v, str)
        }
        self.providers[name].budget.learn(clean, tell=False)


def _spent(text: str | None) -> bool:
    try:
        return text is not None and float(text) < 1
    except ValueError:
        return False


def share_providers(
    settings: Settings, providers: Mapping[str, Provider], worker: Worker | None
) -> GatewaySharing | None:
    """Share ``providers`` through Redis or the workers' hub, or None when this process
    is alone. Call before the providers start (their probers ask whose turn it is)."""
    bus: SharedBus
    limits = None
    if settings.shared_redis is not None:
        # The optional extra: imported only when used.
        from gateway.limits_redis import share_limits
        from gateway.shared_redis import RedisBus

        redis_bus = RedisBus(settings.sharing)
        limits = share_limits(redis_bus, providers)
        bus = redis_bus
    elif worker is not None and worker.hub is not None:
        from gateway.hub import HubBus

        bus = HubBus(worker.hub, f"worker-{worker.index}:{os.getpid()}")
    else:
        metrics.export_shared_series(shared=False)
        return None
    metrics.export_shared_series(shared=True)
    return GatewaySharing(bus, providers, limits)
