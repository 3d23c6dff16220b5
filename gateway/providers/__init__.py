"""Upstream API dialects: how the gateway speaks to each kind of provider.

A new dialect is one module here and one line in :data:`DIALECTS`.
"""

from gateway.providers.base import Dialect
from gateway.providers.openai import OpenAIDialect

DIALECTS: dict[str, Dialect] = {
    "openai": OpenAIDialect(),
}

__all__ = ["DIALECTS", "Dialect"]
