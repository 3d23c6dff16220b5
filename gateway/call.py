"""The request record every layer writes to: a client call, its attempts, its answer.

The failover loop fills :class:`Call` with :class:`AttemptRecord`\\ s and ends with a
:class:`Reply` (a complete upstream answer) or a :class:`StreamStart` (a stream that has
produced its first token); the responders and the request log line read it back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.errors import Classified, Outcome

if TYPE_CHECKING:
    from collections.abc import Callable

    import aiohttp
    from multidict import CIMultiDictProxy

    from breakers import Permit, ProviderBreaker
    from gateway.budgets import Correctable
    from gateway.rescue import Rescue
    from gateway.sse import SSEParser
    from gateway.stream import StreamState
    from gateway.upstream import Lease, Provider


@dataclass(slots=True)
class AttemptRecord:
    """One try on one provider, or one skip."""

    provider: Provider
    outcome: Outcome
    detail: str
    wait: float = 0.0  # backoff slept before this try
    retry_after: float | None = None
    cause: str = ""  # for a skip over an open breaker: the kind of failure that opened it

    def describe(self) -> str:
        """``LM Studio: unreachable (cannot connect: Connection refused)``."""
        waited = f" after {self.wait:.2f}s backoff" if self.wait else ""
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.provider.display_name}: {self.outcome.value}{detail}{waited}"


@dataclass(slots=True)
class Call:
    """One client request as the loop sees it, and what became of it."""

    endpoint: str  # "chat/completions", "completions" or "embeddings"
    body: dict[str, Any]
    raw: bytes
    model: str
    stream: bool
    request_id: str
    deadline: float  # event-loop time
    deadline_chosen: bool = False  # the client set it (x-gateway-timeout)
    started: float = field(default_factory=time.perf_counter)
    waited: float = 0.0  # seconds spent waiting on upstreams, backoff and queues
    records: list[AttemptRecord] = field(default_factory=list)
    first_route: Provider | None = None
    # Filled in as the response goes out, for the completion log line and metrics.
    answered_by: Provider | None = None
    status: int = 0
    result: str = ""  # an Outcome value, or how the stream ended
    first_token_at: float | None = None  # perf_counter
    usage: dict[str, Any] | None = None
    backoff: float = 0.0  # seconds slept in backoff, on any provider (one budget)
    # Request-fault errors (see gateway.errors.request_fault): each provider's error shape,
    # and the breaker verdicts held until the request is over.
    refusals: list[tuple[Provider, str]] = field(default_factory=list)
    deferred: list[tuple[tuple[ProviderBreaker, Permit], Classified]] = field(default_factory=list)
    poisoned: bool = False  # two providers refused it alike: the request's own fault
    waiting_on: str = ""  # the provider a cancelled request was waiting on
    waited_for: float = 0.0  # and for how long
    # Rate budgets (gateway.budgets): the request's estimated tokens (0: not estimated),
    # and the budgets charged them that the answer's usage corrects.
    token_estimate: int = 0
    token_charges: tuple[Correctable, ...] = ()
    cache: str = ""  # hit, miss, coalesced or bypass; "" when the cache was not asked
    cache_source: str = ""  # on a hit: the provider that produced the stored answer
    rescue: Rescue | None = None  # set when a stream cut after commit may be rescued

    @property
    def failover(self) -> bool:
        """True when the answer did not come from the first route."""
        return self.answered_by is not None and self.answered_by is not self.first_route

    @property
    def provider_name(self) -> str:
        """Who answered, for headers, metrics and the log: ``cache`` on a cache hit."""
        if self.cache == "hit":
            return "cache"
        return self.answered_by.name if self.answered_by is not None else "none"


@dataclass(slots=True)
class Reply:
    """A complete upstream response to pass through."""

    provider: Provider
    outcome: Outcome
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    usage: dict[str, Any] | None = None


@dataclass(slots=True)
class StreamStart:
    """An upstream stream that has produced its first token; the relay takes it over."""

    provider: Provider
    lease: Lease
    resp: aiohttp.ClientResponse
    parser: SSEParser
    state: StreamState  # has judged every event read so far
    held: list[bytes]  # what the client gets at commit: every event up to the end of the read
    # A vendor's stream translator (gateway.providers): each read goes through it before
    # the parser; None for OpenAI's SSE, whose bytes pass as they came.
    feed: Callable[[bytes, bool], bytes] | None = None
