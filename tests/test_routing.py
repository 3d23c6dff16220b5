"""Routing: model name to the ordered failover chain."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.routing import Router


@dataclass(frozen=True)
class P:
    name: str


OPENAI, LMS, OLLAMA = P("openai"), P("lmstudio"), P("ollama")


def router(aliases=None):
    return Router(
        [OPENAI, LMS, OLLAMA],
        {"openai": None, "lmstudio": "local-model", "ollama": "llama3.2"},
        aliases or {},
    )


def chain(routes):
    return [(r.provider.name, r.model) for r in routes]


def test_default_chain():
    assert chain(router().route("gpt-4o")) == [
        ("openai", "gpt-4o"),
        ("lmstudio", "local-model"),
        ("ollama", "llama3.2"),
    ]


def test_pin_moves_provider_first():
    assert chain(router().route("ollama/qwen2.5:7b")) == [
        ("ollama", "qwen2.5:7b"),
        ("openai", "qwen2.5:7b"),
        ("lmstudio", "local-model"),
    ]


def test_slash_that_is_not_a_provider_is_a_model_name():
    assert chain(router().route("meta-llama/Llama-3-8b"))[0] == ("openai", "meta-llama/Llama-3-8b")


def test_alias_resolves_once():
    r = router({"fast": "lmstudio/phi-3", "phi": "fast"})
    assert chain(r.route("fast"))[0] == ("lmstudio", "phi-3")
    assert chain(r.route("phi"))[0] == ("openai", "fast")
    assert r.known_models() == {"fast", "phi", "local-model", "llama3.2"}
