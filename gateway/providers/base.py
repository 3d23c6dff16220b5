"""What a dialect provides: the translation between the gateway and one kind of API.

A dialect is built once per configured provider. For each attempt it gives an
:data:`Outgoing` request: the URL, the encoded body and a :class:`Translator` that turns
the upstream's answer into OpenAI's wire format (a ``chat.completion`` body, an error
body, ``chat.completion.chunk`` events). The failover loop, the stream state and the
relay drive the translator without knowing which vendor is behind it; everything past it
(judging a body, the first-token rule, completion per choice, usage, classification) is
the same code for every vendor.

For OpenAI-compatible upstreams the translator is :data:`IDENTITY`: the bytes pass
untouched and a stream keeps the relay's fast path, at no cost per event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from multidict import CIMultiDictProxy

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.config import ProviderConfig


class Unsupported(Exception):
    """A valid OpenAI request this dialect cannot express (``n > 1`` for Anthropic, say):
    the provider is skipped as ``unsupported`` and the next one is tried."""


class BadRequest(Exception):
    """A request too malformed to translate: the client gets a 400, as an upstream that
    received it would have answered."""


class BadAnswer(ValueError):
    """A 2xx answer that is not what the vendor's API sends: ``bad_response``."""


class Translator:
    """One upstream answer in OpenAI's terms; this base class is the identity.

    ``feed`` is None for an upstream that streams OpenAI's SSE itself: its bytes go to the
    stream state as they came. A translator that rewrites a stream sets ``feed`` to a
    callable taking each piece of the body (and ``end=True`` with ``b""`` once it ended)
    and returning OpenAI SSE bytes, possibly empty.
    """

    __slots__ = ()

    #: The media type of the upstream's stream.
    stream_type = "text/event-stream"
    feed: Callable[[bytes, bool], bytes] | None = None

    def headers(self, headers: CIMultiDictProxy[str]) -> CIMultiDictProxy[str]:
        """Response headers as OpenAI would name them (rate limits, mostly)."""
        return headers

    def answer(self, body: bytes) -> bytes:
        """A complete 2xx body as a ``chat.completion`` (raises :class:`BadAnswer`)."""
        return body

    def error(self, status: int, body: bytes) -> bytes:
        """An error body in OpenAI's shape, with the ``code`` that classifies it."""
        return body


#: The translator of every OpenAI-compatible answer.
IDENTITY = Translator()


#: One attempt's request and how its answer is read: ``(url, body, translator)``. A plain
#: tuple: built for every attempt, it costs a tenth of a named tuple or a dataclass.
Outgoing = tuple[str, bytes, Translator]


class Dialect(Protocol):
    """How the gateway speaks to one configured provider."""

    endpoints: frozenset[str]
    #: What a configured base URL is made to end in: ``/v1``, or ``""`` for APIs whose
    #: paths start at the server's root (native Ollama, Azure).
    base_path: str
    #: Where the health probe lists models, and (native Ollama) which are in memory.
    models_url: str
    running_url: str | None
    #: True when the model list can decide ``model_missing`` for a configured model:
    #: a local server lists what it serves, a hosted API accepts names it does not list.
    judges_models: bool

    def headers(self, api_key: str | None) -> dict[str, str]:
        """Headers for every upstream request, probes included."""
        ...

    def model_ids(self, body: bytes) -> frozenset[str] | None:
        """Model ids from a model-list body; None when it is not one."""
        ...

    def request(self, call: Call, model: str) -> Outgoing:
        """``call`` for ``model`` on this provider (raises :class:`Unsupported` or
        :class:`BadRequest`)."""
        ...


#: What builds a provider's dialect: its configuration and the largest event it may send.
DialectFactory = Callable[["ProviderConfig", int], Dialect]


def api_root(base_url: str) -> str:
    """``base_url`` without the ``/v1`` that OpenAI-style configuration adds."""
    return base_url.removesuffix("/v1")


def text_of(content: Any, where: str) -> str:
    """The text of an OpenAI message ``content``: a string, or text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or an array of parts")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict):
            raise BadRequest(f"{where}.content[{i}] must be an object")
        if part.get("type") != "text":
            raise Unsupported(f"{where}.content[{i}] of type {part.get('type')!r} here")
        text = part.get("text")
        if not isinstance(text, str):
            raise BadRequest(f"{where}.content[{i}].text must be a string")
        texts.append(text)
    return "".join(texts)


def max_tokens(body: dict[str, Any]) -> int | None:
    """The client's output cap: ``max_completion_tokens`` or (older) ``max_tokens``."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if type(value) is not int or value < 1:
            raise BadRequest(f"'{key}' must be a positive integer")
        return value
    return None


def stop_list(body: dict[str, Any]) -> list[str] | None:
    """``stop`` (a string or a list of strings) as a list; None when absent."""
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise BadRequest("'stop' must be a string or an array of strings")


def check_common(body: dict[str, Any], vendor: str) -> None:
    """Refuse what no translated vendor offers: several choices, token logprobs and the
    legacy ``functions`` (``tools`` replaced them)."""
    n = body.get("n")
    if n is not None and n != 1:
        raise Unsupported(f"{vendor} answers one choice, not n={n!r}")
    if body.get("logprobs"):
        raise Unsupported(f"{vendor} does not return logprobs")
    if body.get("functions"):
        raise Unsupported(f"legacy functions on {vendor}")
