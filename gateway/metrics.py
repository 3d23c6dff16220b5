"""Every Prometheus metric the gateway exports, defined once.

The Grafana dashboards and alert rules query these names; a test checks that every name
they use is defined here. Label values come from configuration (provider names,
configured models and aliases, outcome classes); a model a client invents is ``other``.

Under ``--workers`` every worker writes its metrics to files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode, chosen when the
module is imported) and ``/metrics``, whichever worker answers, sums them: counters and
histograms add up, and each gauge says how its workers' values combine (its
``multiprocess_mode``): in-flight requests and queue depths add up, a breaker's state and
a provider's probe are the most recent any worker saw. A gauge computed when read
(:func:`gauge_function`) is written by each worker once a second instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

#: True when this process writes its metrics to files for other workers to read.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
#: The exposition's media type.
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _CachedChildren:
    """Label children looked up once per label set: prometheus-client's ``labels()`` takes
    a lock and checks its arguments on every call (about 1.5 us, several per request).
    Label sets are bounded by design (see above), and so is the cache."""

    def labels(self, *values: Any, **named: Any) -> Any:
        """The child for ``values`` (positional), from the cache after the first time."""
        if named:
            return super().labels(*values, **named)  # type: ignore[misc]
        try:
            cache: dict[tuple[Any, ...], Any] = self._gateway_children  # type: ignore[has-type]
        except AttributeError:
            cache = self._gateway_children = {}
        child = cache.get(values)
        if child is None:
            child = cache[values] = super().labels(*values)  # type: ignore[misc]
        return child

    def remove(self, *values: Any) -> None:
        """Remove one child (and forget it)."""
        self.__dict__.pop("_gateway_children", None)
        super().remove(*values)  # type: ignore[misc]

    def clear(self) -> None:
        """Remove every child (and forget them)."""
        self.__dict__.pop("_gateway_children", None)
        super().clear()  # type: ignore[misc]


class Counter(_CachedChildren, prometheus_client.Counter):
    """A counter with cached label children."""


class Gauge(_CachedChildren, prometheus_client.Gauge):
    """A gauge with cached label children."""


class Histogram(_CachedChildren, prometheus_client.Histogram):
    """A histogram with cached label children."""


_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

REQUESTS = Counter(
    "gateway_requests_total",
    "Client requests, by the provider that answered ('none' when none did) and HTTP status",
    ["model", "provider", "status", "stream"],
)
UPSTREAM_ATTEMPTS = Counter(
    "gateway_upstream_attempts_total",
    "Attempts on upstream providers, by outcome class (skips included)",
    ["provider", "outcome"],
)
FAILOVERS = Counter(
    "gateway_failovers_total",
    "Moves from one provider to the next within a request",
    ["from_provider", "to_provider", "reason"],
)
REQUEST_DURATION = Histogram(
    "gateway_request_duration_seconds",
    "Time from receiving a client request to the end of its response",
    ["model", "provider", "stream"],
    buckets=_LATENCY_BUCKETS,
)
TTFT = Histogram(
    "gateway_time_to_first_token_seconds",
    "Time from receiving a streaming request to sending its first token",
    ["provider"],
    buckets=_LATENCY_BUCKETS,
)
OVERHEAD = Histogram(
    "gateway_overhead_seconds",
    "Time spent in the gateway itself, excluding waits for upstreams, backoff and queues",
    buckets=_OVERHEAD_BUCKETS,
)
BREAKER_STATE = Gauge(
    "gateway_breaker_state",
    "Circuit breaker state per provider: 0 closed, 1 half-open, 2 open",
    ["provider"],
    multiprocess_mode="livemostrecent",
)
BREAKER_TRANSITIONS = Counter(
    "gateway_breaker_transitions_total",
    "Circuit breaker state changes",
    ["provider", "from_state", "to_state"],
)
PROVIDER_UP = Gauge(
    "gateway_provider_up",
    "1 when the provider's last health probe succeeded, else 0",
    ["provider"],
    multiprocess_mode="livemostrecent",
)
PROBE_DURATION = Histogram(
    "gateway_probe_duration_seconds",
    "Duration of health probes (GET /v1/models)",
    ["provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
INFLIGHT = Gauge(
    "gateway_inflight_requests",
    "Requests currently being sent to or streamed from each provider",
    ["provider"],
    multiprocess_mode="livesum",
)
QUEUE_WAIT = Histogram(
    "gateway_queue_wait_seconds",
    "Time requests waited for a provider's concurrency slot",
    ["provider"],
    buckets=_QUEUE_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "gateway_queue_depth",
    "Requests waiting in each provider's queue, for a concurrency slot or rate budget",
    ["provider"],
    multiprocess_mode="livesum",
)
BUDGET_WAIT = Histogram(
    "gateway_budget_wait_seconds",
    "Time requests waited in a provider's queue while its rate budget held the line",
    ["provider"],
    buckets=_QUEUE_BUCKETS,
)
BUDGET_REMAINING = Gauge(
    "gateway_budget_remaining",
    "What each provider's rate budget holds now (configured or learned), by kind: "
    "requests or tokens",
    ["provider", "kind"],
    multiprocess_mode="livesum",  # a shared budget is reported by one worker only
)
CLIENT_QUOTA_REFUSALS = Counter(
    "gateway_client_quota_refusals_total",
    "Client requests refused with 429 because the client's key was over its own quota, "
    "by client name and the quota that was spent (requests or tokens)",
    ["client", "kind"],
)
TOKENS = Counter(
    "gateway_tokens_total",
    "Tokens reported by upstream usage blocks",
    ["provider", "kind"],
)
CLIENT_DISCONNECTS = Counter(
    "gateway_client_disconnects_total",
    "Client requests abandoned by the client before their response ended",
)
STREAM_INTERRUPTIONS = Counter(
    "gateway_stream_interruptions_total",
    "Streams that failed after their first token reached the client (too late to fail "
    "over), by provider and outcome class",
    ["provider", "reason"],
)
DROPPED_EVENTS = Counter(
    "gateway_stream_events_dropped_total",
    "Upstream stream events dropped after commit because they were not valid JSON",
    ["provider"],
)
CACHE_REQUESTS = Counter(
    "gateway_cache_requests_total",
    "Requests that asked the cache, by result: hit, miss (went upstream), coalesced (shared "
    "another request's upstream call), bypass (not cacheable, or x-gateway-cache: skip)",
    ["result"],
)
CACHE_BYTES = Counter(
    "gateway_cache_bytes_total",
    "Bytes of answers stored in the cache ('stored') and replayed from it ('served')",
    ["op"],
)
CACHE_EVICTIONS = Counter(
    "gateway_cache_evictions_total",
    "Cache entries removed to stay within max_entries and max_bytes ('size'), or found "
    "expired ('expired')",
    ["reason"],
)
CACHE_SIZE = Gauge(
    "gateway_cache_size_bytes",
    "Bytes the cache holds (Redis: as of this process's last write to it)",
    multiprocess_mode="livesum",  # Redis: reported by one worker only
)
CACHE_BACKEND_ERRORS = Counter(
    "gateway_cache_backend_errors_total",
    "Cache backend (Redis) operations that failed or were skipped while it was unreachable; "
    "the request went on as a miss",
    ["op"],
)
CACHE_BACKEND_UP = Gauge(
    "gateway_cache_backend_up",
    "1 while the cache backend answers (always 1 for the in-memory cache), else 0",
    multiprocess_mode="livemin",
)
CACHE_RESULTS = ("hit", "miss", "coalesced", "bypass")

STREAM_RESCUES = Counter(
    "gateway_stream_rescues",
    "Streams that failed after their first token and were restarted to rescue them, by "
    "result: rescued (the restart reproduced what the client had, and went on), continued "
    "(a prefill continuation went on), diverged (the restart said something else: the "
    "stream ended as without rescue), failed (no restart got through the text sent), "
    "skipped (not comparable, or longer than max_prefix_bytes)",
    ["result"],
)
RESCUE_RESULTS = ("rescued", "continued", "diverged", "failed", "skipped")
HEDGES = Counter(
    "gateway_hedges",
    "Hedged streams (the same request sent to the next provider too, the first token "
    "coming late), by result: started, won (the hedge answered first), cancelled (the "
    "first provider answered first and the hedge was cancelled), failed (the hedge got "
    "no answer)",
    ["result"],
)
HEDGE_RESULTS = ("started", "won", "cancelled", "failed")

FAILOVER_POSITION = Gauge(
    "gateway_failover_position",
    "Each enabled provider's place in the failover order (1: the primary), from configuration",
    ["provider"],
    multiprocess_mode="livemax",
)
SHARED_UP = Gauge(
    "gateway_shared_state_up",
    "1 while the shared provider state (Redis, or the workers' supervisor) answers (always "
    "1 for a process that shares nothing), else 0: each process then decides alone",
    multiprocess_mode="livemin",
)
SHARED_ERRORS = Counter(
    "gateway_shared_state_errors_total",
    "Operations on the shared provider state that failed or were skipped while it was "
    "unreachable (the process used its own state instead)",
    ["op"],
)
SHARED_MESSAGES = Counter(
    "gateway_shared_messages_total",
    "Provider state messages sent to other processes, received and applied from them, or "
    "dropped (not sent while the shared state was unreachable, or unreadable)",
    ["direction"],
)
WORKER_RESTARTS = Counter(
    "gateway_worker_restarts_total",
    "Worker processes that died and were started again by the supervisor (--workers)",
)

BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}

# Gauges computed when read (child -> function), written once a second under workers.
_FUNCTIONS: dict[Any, Callable[[], float]] = {}
_reporter = True


def set_worker(index: int) -> None:
    """This process is worker ``index`` of several: values that every worker shares (a
    budget or cache kept in Redis) are reported by worker 0 alone, so that they are not
    counted once per worker."""
    global _reporter
    _reporter = index == 0


def reporter() -> bool:
    """True when this process reports the values its workers share (see set_worker)."""
    return _reporter


def gauge_function(child: Any, function: Callable[[], float]) -> None:
    """Make the gauge ``child`` read ``function()``: at each scrape in one process, once a
    second (and at each scrape of this worker) under workers."""
    if MULTIPROCESS:
        _FUNCTIONS[child] = function
        child.set(function())
    else:
        child.set_function(function)


def refresh() -> None:
    """Write the gauges of :func:`gauge_function` now (workers only)."""
    for child, function in _FUNCTIONS.items():
        child.set(function())


def exposition() -> bytes:
    """The metrics in Prometheus' text format: this process's, or every worker's summed."""
    if not MULTIPROCESS:
        return generate_latest(REGISTRY)
    refresh()
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry)


def export_failover_order(providers: Sequence[str]) -> None:
    """Publish the failover order, so that alerts can follow whichever provider is first
    (OpenAI drops out of the chain without a key). Replaces the order set before."""
    if not MULTIPROCESS:  # a worker's order is the configuration's: nothing to replace
        FAILOVER_POSITION.clear()
    for position, name in enumerate(providers, 1):
        FAILOVER_POSITION.labels(name).set(position)


def model_label(model: str, known: frozenset[str]) -> str:
    """``model`` when configuration names it, else ``other`` (keeps label sets bounded)."""
    return model if model in known else "other"


#: Operations on the shared state whose failures are counted (gateway_shared_state_errors).
SHARED_OPS = ("claim", "send", "subscribe", "admit")


def export_shared_series(shared: bool) -> None:
    """Create the shared state's series at zero (so that rates exist from the start), and
    say that a process sharing nothing has nothing unreachable."""
    for direction in ("sent", "received", "dropped"):
        SHARED_MESSAGES.labels(direction)
    for op in SHARED_OPS:
        SHARED_ERRORS.labels(op)
    SHARED_UP.set(0 if shared else 1)  # a bus says 1 once it is up


def export_cache_series() -> None:
    """Create every cache series at zero, so that rates and ratios exist before the first
    hit, eviction or backend error (the cache is enabled)."""
    for result in CACHE_RESULTS:
        CACHE_REQUESTS.labels(result)
    for op in ("stored", "served"):
        CACHE_BYTES.labels(op)
    for reason in ("size", "expired"):
        CACHE_EVICTIONS.labels(reason)
    for op in ("get", "set"):
        CACHE_BACKEND_ERRORS.labels(op)


def export_stream_series() -> None:
    """Create the rescue and hedge series at zero, so that their rates and the rescue
    success rate exist before the first one."""
    for result in RESCUE_RESULTS:
        STREAM_RESCUES.labels(result)
    for result in HEDGE_RESULTS:
        HEDGES.labels(result)
