"""Rate budgets: token buckets for a provider's requests and tokens per minute.

A provider may have a budget of ``rpm`` requests and ``tpm`` tokens per minute, set in its
TOML table or learned from the ``x-ratelimit-*`` headers of its answers. Each is a token
bucket refilled continuously (``rpm / 60`` per second) that holds ``burst_seconds`` of
refill (at least one request): providers enforce per-minute limits over shorter periods,
so a minute's worth sent at once would earn 429s.

Tokens are charged before the call from :func:`estimate_tokens` and corrected from the
answer's ``usage`` after it (:func:`settle`). What the upstream says in its headers only
ever lowers what is left: ``x-ratelimit-remaining-*`` caps the bucket's level, and an
empty budget (``remaining`` 0) admits nothing until its ``x-ratelimit-reset-*``, after
which the bucket is full again (the upstream's reset). Without a configured budget the
headers create one, with the rate they imply: ``(limit - remaining) / reset`` (the
upstream's own refill rate), or ``limit / 60`` (a per-minute limit) until a reset says
more.

The buckets are in-process; the provider's :class:`~gateway.limits.Limiter` queues the
requests that wait for them, in the same first-come-first-served line as its slots.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from gateway import metrics
from gateway.errors import clamp_seconds, parse_duration, token_count

if TYPE_CHECKING:
    from gateway.call import Call

#: The clock of every bucket: the event loop's (``loop.time()`` is ``time.monotonic()``).
now = time.monotonic

#: Bytes of request body per prompt token in the estimate: OpenAI's rule of thumb is four
#: characters of English per token, and the body's JSON punctuation makes it an overcount.
BYTES_PER_TOKEN = 4
#: Output tokens assumed for a request that sets no ``max_tokens`` (corrected afterwards).
DEFAULT_OUTPUT_TOKENS = 256
# A level this close to what is needed counts as enough (float rounding of the refill).
_EPSILON = 1e-9
_KINDS = ("requests", "tokens")
_REMAINING = ("x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens")
# Per kind: the names of its limit, remaining and reset headers.
_HEADERS = {
    kind: tuple(f"x-ratelimit-{h}-{kind}" for h in ("limit", "remaining", "reset"))
    for kind in _KINDS
}


class Bucket:
    """A token bucket: ``rate`` units per second up to ``capacity``; starts full.

    The level may go below zero (a request larger than the bucket, a charge the usage
    corrected upwards): that debt is waited out like any other shortage. While
    :attr:`hold_until` lies ahead nothing is taken; when it passes the bucket is full.
    """

    __slots__ = ("capacity", "hold_until", "level", "rate", "stamp")

    def __init__(self, rate: float, capacity: float, at: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.level = capacity
        self.stamp = at
        self.hold_until = 0.0

    def refill(self, at: float) -> float:
        """The level at ``at`` (what it will be when a hold ends, while one lasts)."""
        hold = self.hold_until
        if hold:
            if at < hold:
                return self.capacity
            # The upstream's reset has come: its budget is whole again.
            self.level, self.stamp, self.hold_until = self.capacity, hold, 0.0
        if at > self.stamp:
            self.level = min(self.capacity, self.level + (at - self.stamp) * self.rate)
            self.stamp = at
        return self.level

    def wait(self, amount: float, at: float, ahead: float = 0.0) -> float:
        """Seconds from ``at`` until ``amount`` may be taken, after ``ahead`` units taken
        first by those in line before it. An amount larger than the bucket needs a full
        bucket, and leaves a debt."""
        level = self.refill(at)
        held = max(0.0, self.hold_until - at)
        short = ahead + min(amount, self.capacity) - level
        return held + (short / self.rate if short > _EPSILON else 0.0)

    def take(self, amount: float, at: float) -> None:
        """Take ``amount`` whatever the level (the caller checked :meth:`wait`)."""
        self.refill(at)
        self.level -= amount

    def give(self, amount: float) -> None:
        """Give ``amount`` back (negative: take more), up to the capacity."""
        self.level = min(self.capacity, self.level + amount)

    def observe(self, remaining: float, reset: float | None, at: float) -> None:
        """The upstream says ``remaining`` are left, whole again in ``reset`` seconds."""
        self.refill(at)
        if remaining < self.level:
            self.level = remaining
        if remaining < 1 and reset:
            self.level = min(self.level, 0.0)
            self.hold_until = max(self.hold_until, at + reset)

    def reset_in(self, at: float) -> float:
        """Seconds until the bucket is full again."""
        level = self.refill(at)
        held = max(0.0, self.hold_until - at)
        return held if held else max(0.0, (self.capacity - level) / self.rate)

    def report(self, at: float) -> dict[str, Any]:
        """The bucket for ``/admin/providers``: per minute, burst, left, full again in."""
        level = self.refill(at)
        return {
            "per_minute": round(self.rate * 60, 3),
            "burst": round(self.capacity, 3),
            "remaining": round(level if at >= self.hold_until else 0.0, 3),
            "full_in_s": round(self.reset_in(at), 3),
        }


def per_minute(rpm: float, burst_seconds: float, at: float) -> Bucket:
    """A bucket for ``rpm`` per minute holding ``burst_seconds`` of refill (at least 1)."""
    rate = rpm / 60
    return Bucket(rate, max(1.0, rate * burst_seconds), at)


class Budget:
    """A provider's budgets for requests and tokens, configured or learned.

    :attr:`active` is False until either exists, so a provider without one pays nothing
    but that check. :attr:`wake` is the queue to poke when a correction frees tokens;
    :attr:`on_learn` is told what was learned from an answer's headers (to share it).
    """

    __slots__ = (
        "_burst",
        "_cap",
        "_fixed",
        "active",
        "name",
        "on_learn",
        "requests",
        "tokens",
        "wake",
    )

    def __init__(
        self, name: str, rpm: float, tpm: float, burst_seconds: float, reset_cap: float
    ) -> None:
        self.name = name
        self._burst = burst_seconds
        self._cap = reset_cap  # the longest hold an upstream's reset may ask for
        at = now()
        self.requests = per_minute(rpm, burst_seconds, at) if rpm else None
        self.tokens = per_minute(tpm, burst_seconds, at) if tpm else None
        self._fixed = {"requests": bool(rpm), "tokens": bool(tpm)}  # set by the operator
        self.active = False
        self.wake: Callable[[], None] | None = None
        self.on_learn: Callable[[str, Mapping[str, str]], None] | None = None
        for kind in _KINDS:
            if getattr(self, kind) is not None:
                self._activate(kind)

    def _activate(self, kind: str) -> None:
        self.active = True
        child = metrics.BUDGET_REMAINING.labels(self.name, kind)
        metrics.gauge_function(child, lambda: self.remaining(kind))

    def remaining(self, kind: str) -> float:
        """What the ``kind`` bucket holds now (0 while held), for the gauge."""
        bucket: Bucket | None = getattr(self, kind)
        if bucket is None:
            return 0.0
        at = now()
        level = bucket.refill(at)
        return level if at >= bucket.hold_until else 0.0

    def wait(self, tokens: int, at: float, ahead: int = 0, ahead_tokens: int = 0) -> float:
        """Seconds until one request of ``tokens`` fits, behind ``ahead`` requests of
        ``ahead_tokens`` tokens in all."""
        wait = 0.0
        if self.requests is not None:
            wait = self.requests.wait(1, at, ahead)
        if self.tokens is not None:
            wait = max(wait, self.tokens.wait(tokens, at, ahead_tokens))
        return wait

    def take(self, tokens: int, at: float) -> bool:
        """Take one request of ``tokens`` if both buckets have it now."""
        if self.wait(tokens, at) > 0:
            return False
        self.charge(tokens, at)
        return True

    def charge(self, tokens: int, at: float) -> None:
        """Take one request of ``tokens`` whatever is left (a retry, already admitted)."""
        if self.requests is not None:
            self.requests.take(1, at)
        if self.tokens is not None:
            self.tokens.take(tokens, at)

    def refund(self, tokens: int) -> None:
        """Give back a request that was never sent."""
        if self.requests is not None:
            self.requests.give(1)
        if self.tokens is not None:
            self.tokens.give(tokens)

    def correct(self, surplus: int) -> None:
        """The answer used ``surplus`` tokens fewer than charged (negative: more)."""
        if self.tokens is not None:
            self.tokens.give(surplus)
            if surplus > 0 and self.wake is not None:
                self.wake()

    def learn(self, headers: Mapping[str, str], tell: bool = True) -> None:
        """Update the buckets from an answer's ``x-ratelimit-*`` headers (``tell``: that
        came here, so :attr:`on_learn` hears of it).

        A kind is learned only from a ``remaining`` header, and a bucket is created for
        it only with a ``limit`` too (no rate can be known without one).
        """
        if _REMAINING[0] not in headers and _REMAINING[1] not in headers:
            return  # most answers: two lookups and out
        if tell and self.on_learn is not None:
            self.on_learn(self.name, headers)
        for kind in _KINDS:
            limit_h, remaining_h, reset_h = _HEADERS[kind]
            remaining = _count(headers.get(remaining_h))
            if remaining is None:
                continue
            limit = _count(headers.get(limit_h))
            text = headers.get(reset_h)
            reset = clamp_seconds(parse_duration(text), self._cap) if text else None
            at = now()
            bucket: Bucket | None = getattr(self, kind)
            if not self._fixed[kind] and limit:
                rate = None
                if reset and limit > remaining:
                    rate = (limit - remaining) / reset  # the upstream's own refill rate
                elif bucket is None:
                    rate = limit / 60
                if rate is not None:
                    capacity = max(1.0, rate * self._burst)
                    if bucket is None:
                        bucket = Bucket(rate, capacity, at)
                        setattr(self, kind, bucket)
                        self._activate(kind)
                    else:
                        bucket.refill(at)
                        bucket.rate, bucket.capacity = rate, capacity
                        bucket.level = min(bucket.level, capacity)
            if bucket is not None:
                bucket.observe(remaining, reset, at)

    def report(self) -> dict[str, Any] | None:
        """The budgets for ``/admin/providers``, or None when there are none."""
        if not self.active:
            return None
        at = now()
        out: dict[str, Any] = {}
        for kind in _KINDS:
            bucket: Bucket | None = getattr(self, kind)
            if bucket is not None:
                out[kind] = {
                    **bucket.report(at),
                    "source": "configured" if self._fixed[kind] else "learned",
                }
        return out


def _count(text: str | None) -> float | None:
    """A header's count: a finite number from 0 to 10^9, else None (untrusted input)."""
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 <= value <= 1e9 else None  # also refuses nan and inf


def estimate_tokens(call: Call) -> int:
    """A cheap, documented guess of the tokens a request will use, before it is sent.

    Prompt: the body's size in bytes / :data:`BYTES_PER_TOKEN` (no tokenizer; JSON
    punctuation makes it an overcount, images in base64 a large one). Output:
    ``max_completion_tokens`` or ``max_tokens`` times ``n``, else
    :data:`DEFAULT_OUTPUT_TOKENS` (none for embeddings). Corrected from ``usage`` after
    the call by :func:`settle`.
    """
    if call.token_estimate:
        return call.token_estimate
    body = call.body
    prompt = math.ceil(len(call.raw) / BYTES_PER_TOKEN)
    output = 0
    if call.endpoint != "embeddings":
        most = token_count(body.get("max_completion_tokens")) or token_count(body.get("max_tokens"))
        n = token_count(body.get("n")) or 1
        output = (most if most is not None else DEFAULT_OUTPUT_TOKENS) * min(n, 128)
    call.token_estimate = max(1, prompt + output)
    return call.token_estimate


def cost(call: Call, budget: Budget) -> int:
    """The tokens ``call`` is charged on a provider with ``budget`` (0: no token budget)."""
    return estimate_tokens(call) if budget.tokens is not None else 0


class Correctable(Protocol):
    """A budget charged a call's estimated tokens, to be told how many it really used."""

    def correct(self, surplus: int) -> None:
        """The call used ``surplus`` tokens fewer than estimated (negative: more)."""


def settle(call: Call) -> None:
    """Correct every token charge of an answered call from its ``usage``."""
    used = _used(call.usage)
    if used is None:
        return  # no usage: the estimate stands
    surplus = call.token_estimate - used
    for budget in call.token_charges:
        budget.correct(surplus)


def _used(usage: Any) -> int | None:
    """Total tokens of a ``usage`` block (untrusted), or None."""
    if not isinstance(usage, dict):
        return None
    total = token_count(usage.get("total_tokens"))
    if total is not None:
        return total
    prompt = token_count(usage.get("prompt_tokens"))
    completion = token_count(usage.get("completion_tokens"))
    if prompt is None and completion is None:
        return None
    return (prompt or 0) + (completion or 0)


def format_duration(seconds: float) -> str:
    """``seconds`` in OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    seconds = math.ceil(seconds * 100) / 100  # never earlier than it is
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.2f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes:
        return f"{int(minutes)}m{text}"
    return text
