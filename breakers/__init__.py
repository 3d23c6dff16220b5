"""Reusable circuit breakers and health probes; nothing here knows the gateway's routes."""

from breakers.breaker import STALLED_KIND, Cause, Permit, ProviderBreaker, State
from breakers.probes import Prober, ProbeResult

__all__ = ["STALLED_KIND", "Cause", "Permit", "ProbeResult", "Prober", "ProviderBreaker", "State"]
