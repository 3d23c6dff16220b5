"""Upstream API dialects: how the gateway speaks to each kind of provider.

A new dialect is one module here and one line in :data:`DIALECTS`.
"""

from gateway.providers.anthropic import AnthropicDialect
from gateway.providers.azure import AzureDialect
from gateway.providers.base import Dialect, DialectFactory
from gateway.providers.ollama import OllamaDialect
from gateway.providers.openai import OpenAIDialect

#: Each dialect's name (a provider's ``dialect`` setting) and what builds it.
DIALECTS: dict[str, DialectFactory] = {
    "openai": OpenAIDialect,
    "anthropic": AnthropicDialect,
    "ollama": OllamaDialect,
    "azure": AzureDialect,
}

__all__ = ["DIALECTS", "Dialect", "DialectFactory"]
