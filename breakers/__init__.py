"""Reusable circuit breakers and health probes; nothing here knows the gateway's routes."""

from breakers.breaker import Cause, Permit, ProviderBreaker, State
from breakers.probes import Prober, ProbeResult

__all__ = ["Cause", "Permit", "ProbeResult", "Prober", "ProviderBreaker", "State"]
