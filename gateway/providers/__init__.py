"""Upstream API dialects, and the runtime state of each configured provider.

A new dialect is one module here and one line in :data:`DIALECTS`.
"""

from gateway.providers.base import Dialect
from gateway.providers.openai import OpenAIDialect

DIALECTS: dict[str, Dialect] = {
    "openai": OpenAIDialect(),
}

__all__ = ["DIALECTS", "Dialect"]
