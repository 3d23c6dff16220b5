"""Routing: a requested model becomes an ordered list of (provider, upstream model)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

P = TypeVar("P")  # anything with a ``name``
_CACHED_NAMES = 1024  # model names whose routes are kept


@dataclass(frozen=True, slots=True)
class Route(Generic[P]):
    """One step of the failover chain."""

    provider: P
    model: str  # the name the upstream receives


class Router(Generic[P]):
    """Maps a client's model name to the failover chain.

    * an alias from configuration is resolved first (one level);
    * ``NAME/MODEL``, where NAME is a configured provider, pins that provider first with
      MODEL as its upstream model; the rest of the chain follows;
    * every provider then receives its configured model (LM Studio's, Ollama's), or the
      client's model unchanged when none is configured (OpenAI).
    """

    def __init__(
        self,
        providers: Sequence[P],
        models: Mapping[str, str | None],
        aliases: Mapping[str, str],
    ) -> None:
        """``models`` gives each provider name its configured upstream model, or None."""
        self._providers = list(providers)
        self._names = {self._name(p): p for p in providers}
        self._models = dict(models)
        self._aliases = dict(aliases)
        self._cache: dict[str, tuple[Route[P], ...]] = {}

    @staticmethod
    def _name(provider: P) -> str:
        return provider.name  # type: ignore[attr-defined, no-any-return]

    def route(self, model: str) -> tuple[Route[P], ...]:
        """The ordered attempts for ``model`` (made once per model name: configuration
        does not change while the gateway runs)."""
        routes = self._cache.get(model)
        if routes is None:
            if len(self._cache) >= _CACHED_NAMES:  # names are the clients' to invent
                self._cache.clear()
            routes = self._cache[model] = self._route(model)
        return routes

    def _route(self, model: str) -> tuple[Route[P], ...]:
        model = self._aliases.get(model, model)
        pinned: P | None = None
        prefix, sep, rest = model.partition("/")
        if sep and rest and prefix in self._names:
            pinned = self._names[prefix]
            model = rest
        routes: list[Route[P]] = []
        if pinned is not None:
            routes.append(Route(pinned, model))
        for p in self._providers:
            if p is pinned:
                continue
            routes.append(Route(p, self._models[self._name(p)] or model))
        return tuple(routes)

    def known_models(self) -> frozenset[str]:
        """Names that configuration mentions (for bounded metric labels)."""
        names = set(self._aliases)
        names.update(m for m in self._models.values() if m)
        return frozenset(names)
