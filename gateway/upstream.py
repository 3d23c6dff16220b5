"""A configured provider at run time: session, breaker, prober, limiter, budget, and the
lease that admits one attempt.

``providers/`` holds the API dialects only; this module holds what the gateway keeps per
configured provider for the life of the process.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import aiohttp
from aiobreaker import CircuitBreakerListener

from breakers import STALLED_KIND, Cause, Permit, Prober, ProbeResult, ProviderBreaker, State
from breakers.breaker import state_of
from gateway import metrics
from gateway.budgets import Budget
from gateway.config import ProviderConfig, Settings
from gateway.errors import POLICY, BreakerEffect, Outcome
from gateway.hedge import Hedge
from gateway.limits import Limiter, share_of
from gateway.providers import Dialect
from gateway.redact import Redactor

if TYPE_CHECKING:
    from breakers.shared import ProviderShare
    from gateway.status import StatusRecorder

log = logging.getLogger("gateway")

#: The cancel message that moves requests off a provider found hung (its breaker opened
#: because nothing came back from it): they fail over instead of waiting out their timeout.
STALLED = "provider stalled"

#: Set by the connector for the request being sent in this task: True when its
#: connection came from the pool (it may have been closed by the server meanwhile).
REUSED: ContextVar[bool] = ContextVar("gateway_connection_reused", default=False)


class _Connector(aiohttp.TCPConnector):
    """A connector that tells whether a request got a pooled connection.

    aiohttp does not resend a POST when a kept-alive connection turns out to be closed;
    the failover loop does, once, but only for a connection that came from the pool.
    """

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._used: weakref.WeakSet[Any] = weakref.WeakSet()

    async def connect(
        self,
        req: Any,
        traces: Any,
        timeout: Any,  # noqa: ASYNC109 (aiohttp's signature)
    ) -> aiohttp.connector.Connection:
        """Get a connection, noting in :data:`REUSED` whether it had served before."""
        conn = await super().connect(req, traces, timeout)
        proto = conn.protocol
        REUSED.set(proto in self._used)
        self._used.add(proto)
        return conn


class _BreakerMetrics(CircuitBreakerListener):
    """Mirrors breaker transitions into Prometheus, the log and the status page, with
    their cause."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider.name
        self.display_name = provider.display_name
        self.where = provider.config.base_url
        self.owner = provider

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        old, new = state_of(old_state), state_of(new_state)
        metrics.BREAKER_STATE.labels(self.provider).set(metrics.BREAKER_STATE_VALUES[new])
        metrics.BREAKER_TRANSITIONS.labels(self.provider, old.value, new.value).inc()
        breaker = self.owner.breaker
        self.owner.status.transition(self.provider, old, new, _reason(old, new, breaker.cause))
        if new is State.OPEN:
            # Once per opening: what failed, where, and what the gateway does about it.
            log.warning(
                "%s circuit breaker %s -> open: %s at %s; requests skip it for %.0fs",
                self.display_name,
                old.value,
                breaker.cause or "failures",
                self.where,
                breaker.open_remaining(),
            )
            if breaker.cause is not None and breaker.cause.kind == STALLED_KIND:
                self.owner.abandon_waiting()
        else:
            log.info("%s circuit breaker %s -> %s", self.display_name, old.value, new.value)


def _reason(old: State, new: State, cause: Cause | None) -> str:
    """Why a breaker moved from ``old`` to ``new``, in words for the status page."""
    if new is State.OPEN:
        why = str(cause or "failures")
        return f"trial failed: {why}" if old is State.HALF_OPEN else why
    if new is State.HALF_OPEN:
        return "one trial request may pass (open period over, or a good probe)"
    return "trial request succeeded"


class Provider:
    """A configured provider: its session, breaker, prober, limiter, budget and load.

    Its breaker's transitions are reported to ``status`` (the status page's recorder).
    """

    def __init__(
        self,
        config: ProviderConfig,
        dialect: Dialect,
        settings: Settings,
        redactor: Redactor,
        status: StatusRecorder,
    ) -> None:
        self.config = config
        self.status = status
        self.name = config.name
        self.display_name = config.display_name
        self.dialect = dialect
        self.settings = settings  # the gateway-wide bounds: event, held and body sizes
        self.redact = redactor
        self.headers = dialect.headers(config.api_key)
        self.breaker = ProviderBreaker(
            config.name, config.fail_max, config.reset_timeout, listeners=[_BreakerMetrics(self)]
        )
        # Progress, to tell a busy provider from a hung one: when a byte last came back from
        # it (loop time), and the requests waiting for its first byte.
        self.last_byte = 0.0
        # Requests with no byte back yet, not even response headers.
        self.waiting: set[asyncio.Task[Any]] = set()
        # Under --workers each process keeps its share of the provider's limits (counted
        # whole, across processes, when they are shared in Redis: gateway.limits_redis).
        self.workers = settings.workers
        share = 1 / self.workers
        self.budget = Budget(
            config.name,
            config.rpm * share,
            config.tpm * share,
            config.burst_seconds,
            config.quota_reset_timeout,
        )
        self.limiter = Limiter(
            share_of(config.max_concurrency, self.workers), config.max_queue, self.budget
        )
        # Streams slow to start are hedged on the next provider (opt-in: hedge_after).
        after = config.hedge_after
        self.hedge = Hedge(after) if after is not None else None
        self.inflight_gauge = metrics.INFLIGHT.labels(self.name)  # looked up once
        metrics.gauge_function(metrics.QUEUE_DEPTH.labels(self.name), lambda: self.limiter.queued)
        self.session: aiohttp.ClientSession | None = None
        self.prober: Prober | None = None
        self.share: ProviderShare | None = None  # set when other processes share its state
        metrics.BREAKER_STATE.labels(self.name).set(0)

    async def start(self, probes: bool = True) -> None:
        """Open the session (one per provider, kept for the process) and start probing."""
        cfg = self.config
        connector = _Connector(
            limit=cfg.max_connections,
            limit_per_host=0,
            ttl_dns_cache=300,
            keepalive_timeout=30,
            ssl=None if cfg.verify_tls else False,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            # Every limit set on purpose: aiohttp's 300 s total would cut long generations;
            # the gateway bounds each phase itself with asyncio.timeout.
            timeout=aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=cfg.connect_timeout, sock_read=None
            ),
            auto_decompress=True,
            trust_env=False,
        )
        self.prober = Prober(
            self.name,
            self.session,
            self.dialect.models_url,
            self.breaker,
            interval=cfg.probe_interval,
            timeout=cfg.probe_timeout,
            headers=self.headers,
            on_result=self._on_probe,
            progress=self.progress_since,
            parse=self.dialect.model_ids,
            running_url=self.dialect.running_url,
            gate=self.share.probe_turn if self.share is not None else None,
            publish=self.share.publish_probe if self.share is not None else None,
        )
        if probes:
            self.prober.start()

    async def close(self) -> None:
        """Stop probing and close the session."""
        if self.prober is not None:
            await self.prober.stop()
        if self.session is not None:
            await self.session.close()

    def _on_probe(self, result: ProbeResult) -> None:
        if not result.inconclusive:
            metrics.PROVIDER_UP.labels(self.name).set(0 if result.error else 1)
        metrics.PROBE_DURATION.labels(self.name).observe(result.latency)

    @property
    def loaded_models(self) -> frozenset[str] | None:
        """Models the last good probe listed, or None before any good probe."""
        return self.prober.models if self.prober is not None else None

    def lacks_model(self, model: str) -> bool:
        """True when the probe shows that ``model`` is not loaded here.

        Only providers with a configured upstream model, whose dialect's list shows what
        they serve, are judged: hosted APIs accept names and aliases their list does not
        show.
        """
        models = self.loaded_models
        if self.config.model is None or not models or not self.dialect.judges_models:
            return False
        return model not in models and f"{model}:latest" not in models

    def progress_since(self, since: float) -> bool | None:
        """Whether this provider is busy (True), hung (False) or idle (None), as seen from
        loop time ``since``: busy when a byte came back since then, or when everything in
        flight has had its headers (a stream on a long prompt is silent for a while); hung
        when a request still waits for its first byte and nothing came back."""
        if self.last_byte >= since:
            return True
        if self.waiting:
            return False
        return True if self.inflight else None

    def abandon_waiting(self) -> None:
        """Move every request still waiting for this provider's first byte elsewhere."""
        for task in list(self.waiting):
            task.cancel(STALLED)
        self.waiting.clear()

    @property
    def inflight(self) -> int:
        """Requests holding a slot here: sending, or streaming from this provider."""
        return self.limiter.in_use

    def usable(self) -> bool:
        """True while a request could be sent now (breaker not open)."""
        return self.breaker.state is not State.OPEN

    async def admit(self) -> Permit | None:
        """The breaker's leave to send one request, or None to skip the provider.

        A half-open trial is one request across every process that shares this
        provider's state: the trial is run here only if this process gets its lease.
        """
        breaker = self.breaker
        permit = breaker.try_acquire()
        if permit is None or not permit.trial or self.share is None:
            return permit
        if await self.share.claim_trial() and permit.epoch == breaker.epoch:
            return permit
        breaker.release(permit)  # another runs the trial, or it opened meanwhile
        return None


class Lease:
    """One request's hold on a provider: breaker permit, concurrency slot, in-flight count.

    :meth:`finish` gives the breaker its verdict and frees everything, exactly once.
    """

    __slots__ = ("_slot", "permit", "provider", "tokens")

    def __init__(self, provider: Provider, permit: Permit) -> None:
        self.provider = provider
        self.permit = permit
        self._slot = False
        self.tokens = 0  # estimated tokens each send is charged on the provider's budget

    def hold_slot(self, tokens: int = 0) -> None:
        """Record that a limiter slot was taken (freed by :meth:`finish`), and the
        provider's budget charged ``tokens`` for it."""
        self._slot = True
        self.tokens = tokens
        self.provider.inflight_gauge.inc()

    def judge(self, outcome: Outcome, open_for: float | None = None, detail: str = "") -> None:
        """Tell the breaker how the request went, keeping the slot."""
        breaker = self.provider.breaker
        effect = POLICY[outcome].breaker
        if effect is BreakerEffect.SUCCESS:
            breaker.record_success(self.permit)
        elif effect is BreakerEffect.FAILURE:
            breaker.record_failure(self.permit, open_for, Cause(outcome.value, detail))
        else:
            breaker.release(self.permit)

    def detach(self) -> tuple[ProviderBreaker, Permit]:
        """Take the permit away for a verdict given later; the lease keeps only its slot."""
        permit = self.permit
        self.permit = Permit(permit.trial, permit.epoch, done=True)
        return self.provider.breaker, permit

    def commit(self) -> None:
        """A stream reached its first token.

        A half-open trial is judged now, so that one long generation does not keep the
        provider half-open (closed to every other request) for minutes; the end of the
        stream is then judged like any other request's.
        """
        permit = self.permit
        if permit.trial:
            breaker = self.provider.breaker
            breaker.record_success(permit)
            self.permit = breaker.try_acquire() or permit

    def finish(self, outcome: Outcome, detail: str = "") -> None:
        """Judge the request and free its slot; later calls do nothing."""
        self.judge(outcome, None, detail)
        if self._slot:
            self._slot = False
            provider = self.provider
            provider.inflight_gauge.dec()
            provider.limiter.release()
