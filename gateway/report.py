"""The providers at a glance: in words for the log (one line each after the first round of
probes), and as data for ``/admin/providers`` and the status page."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from breakers import State
from gateway.upstream import Provider

log = logging.getLogger("gateway")


def provider_status(provider: Provider) -> tuple[bool, str]:
    """(usable, why) for ``provider`` as its breaker and last probe see it."""
    breaker = provider.breaker
    prober = provider.prober
    last = prober.last if prober is not None else None
    if breaker.state is State.OPEN:
        cause = breaker.cause or (last.error if last is not None else None) or "failures"
        return False, f"not usable: {cause}; skipped for {breaker.retry_in():.0f}s"
    if last is None:
        return True, "usable (no probe answer yet)"
    if last.error is not None:
        return True, f"usable, but its probe failed: {last.error}"
    model = provider.config.model
    if model is not None and provider.lacks_model(model):
        loaded = ", ".join(sorted(provider.loaded_models or ())) or "none"
        return True, f"reachable, but model {model!r} is not loaded (loaded: {loaded})"
    running = prober.running if prober is not None else None
    if model is not None and running is not None and not {model, f"{model}:latest"} & running:
        return True, f"usable; model {model!r} is not in memory yet: the first request loads it"
    return True, "usable"


def provider_report(provider: Provider) -> dict[str, Any]:
    """A provider's breaker, last probe, models and load, as ``/admin/providers`` shows them."""
    breaker = provider.breaker
    prober = provider.prober
    last = prober.last if prober is not None else None
    opened = breaker.opened_at
    reopen = breaker.reopen_at()
    return {
        "name": provider.name,
        "display_name": provider.display_name,
        "base_url": provider.config.base_url,
        "model": provider.config.model,
        "state": breaker.state.value,
        "consecutive_failures": breaker.fail_counter,
        "fail_max": breaker.fail_max,
        "opened_at": opened.isoformat() if opened else None,
        "reopens_at": reopen.isoformat() if reopen else None,
        "last_probe": None
        if last is None
        else {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last.at)),
            "latency_ms": round(last.latency * 1000, 2),
            "error": last.error,
        },
        "loaded_models": sorted(provider.loaded_models)
        if provider.loaded_models is not None
        else None,
        # Native Ollama's /api/ps: the models in memory (the others load on first use).
        "running_models": None
        if prober is None or prober.running is None
        else sorted(prober.running),
        "in_flight": provider.inflight,
        "queued": provider.limiter.queued,
        "budget": provider.budget.report(),
    }


async def log_after_first_probes(providers: Sequence[Provider]) -> None:
    """Wait (bounded) for every provider's first probe, then log one line per provider."""
    probers = [p.prober for p in providers if p.prober is not None]
    bound = max((p.config.probe_timeout for p in providers), default=0.0) + 1.0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(bound):
            await asyncio.gather(*(prober.first.wait() for prober in probers))
    for i, provider in enumerate(providers, 1):
        usable, why = provider_status(provider)
        model = provider.config.model or "(the client's)"
        log.log(
            logging.INFO if usable else logging.WARNING,
            "provider %d/%d: %s at %s, model %s: %s",
            i,
            len(providers),
            provider.display_name,
            provider.config.base_url,
            model,
            why,
        )
