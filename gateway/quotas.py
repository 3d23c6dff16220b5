"""Per-client quotas: each gateway key's own requests and tokens per minute.

A key's quota comes from its line in the keys file (``SHA256HEX name=NAME rpm=N tpm=N``)
or, for what its line does not say (and for keys from ``GATEWAY_API_KEYS``), from
``[clients] default_rpm`` and ``default_tpm``. Each quota is a token bucket that holds a
minute's worth and refills continuously, so a client may send its ``rpm`` at once and then
``rpm / 60`` a second. A request over its client's quota is answered 429 at once, with
``Retry-After`` and ``x-ratelimit-*`` headers describing that client's own budget, and
never reaches a provider: one noisy client cannot spend the others' share of them.

Tokens are charged from the request's estimate (:func:`gateway.budgets.estimate_tokens`)
and corrected from the answer's ``usage``. Quotas live in the process, like the
provider budgets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway import metrics
from gateway.budgets import Bucket, estimate_tokens, format_duration, now
from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.call import Call

#: The metric label of a key whose line gives no ``name=``.
UNNAMED = "unnamed"


@dataclass(frozen=True, slots=True)
class ClientKey:
    """What a keys-file line says about its key besides the digest (None: the default)."""

    name: str | None = None
    rpm: float | None = None
    tpm: float | None = None


@dataclass(frozen=True, slots=True)
class QuotaSettings:
    """``[clients]`` defaults, and the keys file's per-key lines (by digest)."""

    default_rpm: float = 0.0
    default_tpm: float = 0.0
    keys: Mapping[str, ClientKey] = field(default_factory=dict)


class Quota:
    """One client key's budgets: a minute's worth of requests and of tokens."""

    __slots__ = ("name", "requests", "rpm", "tokens", "tpm")

    def __init__(self, name: str, rpm: float, tpm: float) -> None:
        at = now()
        self.name = name
        self.rpm = rpm
        self.tpm = tpm
        self.requests = Bucket(rpm / 60, rpm, at) if rpm else None
        self.tokens = Bucket(tpm / 60, tpm, at) if tpm else None

    def admit(self, call: Call) -> None:
        """Charge ``call`` to this client, or raise the 429 that tells it when to return."""
        at = now()
        tokens = estimate_tokens(call) if self.tokens is not None else 0
        waits = {}
        if self.requests is not None:
            waits["requests"] = self.requests.wait(1, at)
        if self.tokens is not None:
            waits["tokens"] = self.tokens.wait(tokens, at)
        short = [kind for kind, wait in waits.items() if wait > 0]
        if short:
            raise self._refusal(short[0], max(waits.values()), at)
        if self.requests is not None:
            self.requests.take(1, at)
        if self.tokens is not None:
            self.tokens.take(tokens, at)
            call.token_charges += (self,)

    def correct(self, surplus: int) -> None:
        """The answer used ``surplus`` tokens fewer than charged (negative: more)."""
        if self.tokens is not None:
            self.tokens.give(surplus)

    def headers(self, at: float) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for this client's own budget."""
        out: dict[str, str] = {}
        for kind, bucket, limit in (
            ("requests", self.requests, self.rpm),
            ("tokens", self.tokens, self.tpm),
        ):
            if bucket is None:
                continue
            out[f"x-ratelimit-limit-{kind}"] = f"{limit:g}"
            out[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.refill(at))))
            out[f"x-ratelimit-reset-{kind}"] = format_duration(bucket.reset_in(at))
        return out

    def _refusal(self, kind: str, wait: float, at: float) -> GatewayError:
        metrics.CLIENT_QUOTA_REFUSALS.labels(self.name, kind).inc()
        unit = "RPM" if kind == "requests" else "TPM"
        limit = self.rpm if kind == "requests" else self.tpm
        return GatewayError(
            429,
            f"Rate limit reached for this API key on {kind} per min ({unit}): Limit "
            f"{limit:g}. Please try again in {format_duration(wait)}.",
            type_=kind,
            code="rate_limit_exceeded",
            retry_after=max(1, math.ceil(wait)),
            headers=self.headers(at),
        )


class Quotas:
    """Every client key's quota, by the key's digest; empty when no key has one."""

    __slots__ = ("_by_key",)

    def __init__(self, settings: QuotaSettings, client_keys: frozenset[str]) -> None:
        self._by_key: dict[str, Quota] = {}
        for key in client_keys:
            own = settings.keys.get(key, ClientKey())
            rpm = settings.default_rpm if own.rpm is None else own.rpm
            tpm = settings.default_tpm if own.tpm is None else own.tpm
            if rpm or tpm:
                quota = Quota(own.name or UNNAMED, rpm, tpm)
                self._by_key[key] = quota
                # Exported from the start (at 0), so that dashboards see every client.
                for kind, limit in (("requests", rpm), ("tokens", tpm)):
                    if limit:
                        metrics.CLIENT_QUOTA_REFUSALS.labels(quota.name, kind)

    def __bool__(self) -> bool:
        return bool(self._by_key)

    def admit(self, key: str | None, call: Call) -> None:
        """Charge ``call`` to the quota of the key (digest) it came with, if it has one;
        raise a 429 :class:`GatewayError` when that quota is spent."""
        quota = self._by_key.get(key) if key is not None else None
        if quota is not None:
            quota.admit(call)
