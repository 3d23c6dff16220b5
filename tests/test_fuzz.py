"""Hostile input: hypothesis fuzz over the bodies and headers of every endpoint.

Every request goes over a raw loopback socket (so that headers can carry bytes an HTTP
client library would refuse to send) to a gateway whose one provider is a healthy fake
that records the exact bytes it receives. Every case must end in a proper answer or a
4xx OpenAI-style error (``{"error": {message, type, param, code}}``): never a 500,
never a traceback, never an unsafe ``x-request-id``. A valid request reaches the
upstream with its unknown fields untouched (byte for byte when the gateway has no
reason to re-encode it); a rejected one never reaches it.

Requests that aiohttp's HTTP parser rejects before the gateway sees them (a CR, LF or NUL
inside a header value, a header line over 8190 bytes) get aiohttp's own plain-text 400:
those are checked for status, no traceback and no reflected header, not for the OpenAI
shape (see :func:`check_protocol_reject`).

The gateway runs on a private event loop for the whole module (hypothesis drives
synchronous tests), and everything is closed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_from_bytes

import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.auth import AccessPolicy, digest
from gateway.config import Settings
from gateway.server import create_app
from tests.conftest import provider_configs
from tests.fake_upstream import FakeUpstream

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_BODY = 256 * 1024
ALIAS = "fast"  # routed to ALIASED: the gateway re-encodes the body
ALIASED = "gpt-4o-mini"
SAFE_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
ERROR_KEYS = {"message", "type", "param", "code"}
REQUIRED = {
    "/v1/chat/completions": "messages",
    "/v1/completions": "prompt",
    "/v1/embeddings": "input",
}
POST_PATHS = tuple(REQUIRED)
GET_PATHS = ("/v1/models", "/healthz", "/readyz", "/admin/providers", "/metrics")
CLIENT_KEY = "gw-fuzz-client-key-0123456789"
ADMIN_KEY = "gw-fuzz-admin-key-9876543210"


class RecordingUpstream(FakeUpstream):
    """The fake provider, also keeping the raw bytes of every body it receives."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.raw: list[bytes] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.raw.append(await request.read())  # cached: the base handler reads it again
        return await super()._handle(request)


@dataclass
class Answer:
    """A parsed HTTP response."""

    status: int
    headers: list[tuple[bytes, bytes]]  # names lower-cased
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        """Every value of header ``name``."""
        return [v for n, v in self.headers if n == name]


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


async def raw_request(
    port: int, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> Answer:
    """One HTTP/1.1 request written byte for byte; the connection closes after it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
        lines.append(b"Content-Length: %d" % len(body))
        lines += [name + b": " + value for name, value in headers]
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        data = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, rest = data.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 1"):  # an interim answer (100 Continue)
        head, _, rest = rest.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    parsed = []
    for line in header_lines:
        name, _, value = line.partition(b":")
        parsed.append((name.strip().lower(), value.strip()))
    if (b"transfer-encoding", b"chunked") in parsed:
        rest = _dechunk(rest)
    return Answer(int(status_line.split()[1]), parsed, rest)


def note(ans: Answer) -> Answer:
    """Label the example by its status (``pytest --hypothesis-show-statistics``)."""
    event(f"status {ans.status}")
    return ans


class Harness:
    """A gateway on a loopback port in front of a :class:`RecordingUpstream`, on its own
    event loop; :meth:`request` runs one request to completion."""

    def __init__(self, access: AccessPolicy | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.up = RecordingUpstream("a")
        self.runner: web.AppRunner | None = None
        self.port = 0
        try:
            self.loop.run_until_complete(self._start(access))
        except BaseException:
            self.close()
            raise

    async def _start(self, access: AccessPolicy | None) -> None:
        await self.up.start()
        extra = {"access": access} if access is not None else {}
        cfg = Settings(
            providers=provider_configs(self.up),
            aliases={ALIAS: ALIASED},
            max_body_bytes=MAX_BODY,
            request_timeout=20.0,
            **extra,
        )
        self.runner = web.AppRunner(
            create_app(cfg, probes=False), handler_cancellation=True, access_log=None
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    def request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
    ) -> Answer:
        """Send one request; fails the test if no answer comes within 20 s."""

        async def go() -> Answer:
            async with asyncio.timeout(20):
                return await raw_request(self.port, method, target, headers or [], body)

        return self.loop.run_until_complete(go())

    def close(self) -> None:
        """Stop the gateway and the fake, and close the loop."""
        if self.runner is not None:
            self.loop.run_until_complete(self.runner.cleanup())
        self.loop.run_until_complete(self.up.stop())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


@pytest.fixture(scope="module")
def gw() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def locked() -> Iterator[Harness]:
    """A gateway with client keys and an admin key."""
    harness = Harness(AccessPolicy(frozenset({digest(CLIENT_KEY)}), digest(ADMIN_KEY)))
    yield harness
    harness.close()


# -- checks ------------------------------------------------------------------------------


def check_request_id(ans: Answer, sent: bytes | None = None) -> None:
    """One ``x-request-id``, a safe token: the client's own when it was one."""
    ids = ans.header(b"x-request-id")
    assert len(ids) == 1, ans.headers
    assert SAFE_ID.fullmatch(ids[0]), ids
    sent = sent.strip(b" \t") if sent is not None else None
    if sent is not None and SAFE_ID.fullmatch(sent):
        assert ids[0] == sent
    else:
        assert re.fullmatch(rb"[0-9a-f]{32}", ids[0]), ids


def check_no_leak(ans: Answer) -> None:
    """No traceback or Python internals in the body, no injected header."""
    for marker in (b"Traceback", b'File "', b"Error:", b"\\n  File"):
        assert marker not in ans.body, ans.body[:500]
    names = {n for n, _ in ans.headers}
    assert not names & {b"set-cookie", b"injected", b"location"}, ans.headers


def check_error(ans: Answer, status: int | tuple[int, ...] | None = None) -> dict[str, Any]:
    """An OpenAI-style error with a 4xx status (or one of ``status``)."""
    if status is None:
        assert 400 <= ans.status < 500, (ans.status, ans.body[:500])
    else:
        wanted = status if isinstance(status, tuple) else (status,)
        assert ans.status in wanted, (ans.status, ans.body[:500])
    assert ans.header(b"content-type")[0].startswith(b"application/json"), ans.headers
    body = orjson.loads(ans.body)
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    check_no_leak(ans)
    return body["error"]  # type: ignore[no-any-return]


def check_answer(ans: Answer, path: str, stream: bool) -> None:
    """A proper 200 answer for ``path``."""
    assert ans.status == 200, (ans.status, ans.body[:500])
    check_no_leak(ans)
    if stream:
        assert ans.header(b"content-type")[0].startswith(b"text/event-stream")
        assert ans.body.rstrip().endswith(b"data: [DONE]"), ans.body[-200:]
        return
    body = orjson.loads(ans.body)
    expected = {"/v1/embeddings": "list", "/v1/completions": "text_completion"}.get(
        path, "chat.completion"
    )
    assert body["object"] == expected, body


def check_protocol_reject(ans: Answer) -> None:
    """aiohttp's own 400 for a request its parser refuses: no traceback, nothing injected."""
    assert ans.status == 400, (ans.status, ans.body[:500])
    check_no_leak(ans)


def is_protocol_reject(ans: Answer) -> bool:
    """True for aiohttp's parser-level 400 (plain text, before any middleware)."""
    return ans.status == 400 and not ans.header(b"x-request-id")


# -- strategies --------------------------------------------------------------------------

# JSON values orjson accepts (64-bit integers, finite floats, no lone surrogates).
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=40),
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(max_size=10), inner, max_size=5),
    ),
    max_leaves=25,
)
# Anything Python's json module can write: also NaN, Infinity, huge integers, surrogates.
wild_values = st.recursive(
    st.one_of(
        _scalars,
        st.floats(),
        st.integers(),
        st.text(max_size=20),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=15,
)
models = st.one_of(
    st.sampled_from(["gpt-4o-mini", ALIAS, "openai/gpt-4o", "lmstudio/x", "a/b/c", "", " "]),
    st.text(max_size=60),
)
KNOWN = ("model", "messages", "prompt", "input", "stream")
unknown_fields = st.dictionaries(
    st.text(max_size=20).filter(lambda k: k not in KNOWN), json_values, max_size=6
)


def encode(value: Any, ascii_only: bool, compact: bool) -> bytes:
    """JSON as a client might write it (Python's json: NaN, big integers and all)."""
    seps = (",", ":") if compact else (", ", ": ")
    return json.dumps(value, ensure_ascii=ascii_only, separators=seps).encode(
        "utf-8", "surrogatepass"
    )


def valid_body(path: str, model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    """The smallest body ``path`` accepts, plus ``extra``."""
    required = REQUIRED[path]
    value: Any = [{"role": "user", "content": "hi"}] if required == "messages" else "hi"
    return {"model": model, required: value, **extra}


def upstream_model(model: str) -> str:
    """The model the upstream gets (mirrors gateway.routing for this one provider)."""
    model = {ALIAS: ALIASED}.get(model, model)
    prefix, sep, rest = model.partition("/")
    return rest if sep and rest and prefix == "openai" else model


def routes_unchanged(model: Any) -> bool:
    """True when the gateway forwards the client's bytes as they are."""
    return isinstance(model, str) and upstream_model(model) == model


def reencoded(body: dict[str, Any]) -> dict[str, Any]:
    """What the upstream should receive after the gateway rewrote the model."""
    return {**body, "model": upstream_model(body["model"])}


@st.composite
def post_bodies(draw: st.DrawFn) -> tuple[str, Any, bytes]:
    """(path, the value sent or None for raw bytes, the raw body)."""
    path = draw(st.sampled_from(POST_PATHS))
    shape = draw(st.sampled_from(["mutated", "wild", "any_json", "bytes"]))
    value: Any
    if shape == "mutated":  # a valid body with fields of the wrong type, or missing
        value = valid_body(path, draw(models))
        for key in draw(st.lists(st.sampled_from(KNOWN), max_size=3)):
            if draw(st.booleans()):
                value[key] = draw(wild_values)
            else:
                value.pop(key, None)
        value.update(draw(unknown_fields))
    elif shape == "wild":
        value = draw(st.dictionaries(st.sampled_from(KNOWN) | st.text(max_size=8), wild_values))
    elif shape == "any_json":
        value = draw(wild_values)
    else:
        return path, None, draw(st.binary(max_size=300))
    return path, value, encode(value, draw(st.booleans()), draw(st.booleans()))


_DEPTHS = st.integers(1, 12_000) | st.integers(250, 260) | st.integers(1020, 1030)
# Depths a re-encoded body survives, the body object around the value included (orjson
# writes up to 254 levels; see test_deep_nesting_in_a_reencoded_body_is_not_a_500).
_REENCODABLE_DEPTHS = st.integers(1, 253) | st.integers(1025, 12_000)


@st.composite
def nested(draw: st.DrawFn, depths: st.SearchStrategy[int] = _DEPTHS) -> tuple[int, bytes]:
    """(depth, a JSON value nested ``depth`` deep), lists or objects."""
    depth = draw(depths)
    if draw(st.booleans()):
        return depth, b"[" * depth + b"]" * depth
    return depth, b'{"a":' * depth + b"1" + b"}" * depth


# -- POST endpoints: bodies ------------------------------------------------------------


@FUZZ
@given(case=post_bodies())
def test_post_bodies_get_an_answer_or_a_clean_4xx(gw: Harness, case: tuple[str, Any, bytes]):
    path, value, raw = case
    seen = len(gw.up.raw)
    ans = note(gw.request(b"POST", path.encode(), [(b"Content-Type", b"application/json")], raw))
    check_request_id(ans)
    if ans.status != 200:
        check_error(ans)
        assert len(gw.up.raw) == seen, "a rejected request reached the upstream"
        return
    assert isinstance(value, dict)
    check_answer(ans, path, stream=value.get("stream") is True)
    assert len(gw.up.raw) == seen + 1
    received = gw.up.raw[-1]
    if routes_unchanged(value["model"]):
        assert received == raw  # unknown fields and all, byte for byte
    else:
        assert orjson.loads(received) == reencoded(orjson.loads(raw))


@FUZZ
@given(
    path=st.sampled_from(POST_PATHS),
    model=st.sampled_from(["gpt-4o-mini", "my-model", ALIAS, "openai/gpt-4o"]),
    extra=unknown_fields,
    ascii_only=st.booleans(),
    compact=st.booleans(),
)
def test_unknown_fields_are_passed_through_untouched(
    gw: Harness, path: str, model: str, extra: dict[str, Any], ascii_only: bool, compact: bool
):
    body = valid_body(path, model, **extra)
    raw = encode(body, ascii_only, compact)
    seen = len(gw.up.raw)
    ans = note(gw.request(b"POST", path.encode(), [(b"Content-Type", b"application/json")], raw))
    check_answer(ans, path, stream=False)
    check_request_id(ans)
    assert len(gw.up.raw) == seen + 1
    if routes_unchanged(model):
        assert gw.up.raw[-1] == raw
    else:
        assert orjson.loads(gw.up.raw[-1]) == reencoded(body)


@FUZZ
@given(
    path=st.sampled_from(POST_PATHS),
    stream=st.one_of(
        st.integers(-(2**63), 2**64 - 1),  # what orjson can write
        st.floats(allow_nan=False, allow_infinity=False),  # orjson writes inf as null
        st.text(max_size=10),
        st.lists(st.booleans(), max_size=2),
        st.dictionaries(st.text(max_size=3), st.booleans(), max_size=2),
    ),
)
def test_stream_that_is_not_a_bool_is_a_400(gw: Harness, path: str, stream: Any):
    seen = len(gw.up.raw)
    ans = note(
        gw.request(b"POST", path.encode(), [], orjson.dumps(valid_body(path, stream=stream)))
    )
    assert check_error(ans, 400)["param"] == "stream"
    assert len(gw.up.raw) == seen


@FUZZ
@given(
    path=st.sampled_from(POST_PATHS),
    where=st.sampled_from(["body", "field", "required"]),
    model=st.sampled_from(["gpt-4o-mini", "my-model", ALIAS]),
    data=st.data(),
)
def test_deep_nesting_is_an_answer_or_a_400(
    gw: Harness, path: str, where: str, model: str, data: st.DataObject
):
    """orjson parses up to 1024 levels; deeper is a clean 400."""
    depths = _DEPTHS if routes_unchanged(model) else _REENCODABLE_DEPTHS
    depth, value = data.draw(nested(depths), label="nested")
    prefix = b'{"model": "' + model.encode() + b'", '
    if where == "body":
        raw = value
    elif where == "field":
        raw = orjson.dumps(valid_body(path, model))[:-1] + b', "deep": ' + value + b"}"
    else:
        raw = prefix + b'"' + REQUIRED[path].encode() + b'": ' + value + b"}"
    ans = note(gw.request(b"POST", path.encode(), [], raw))
    check_request_id(ans)
    if ans.status != 200:
        check_error(ans, 400)
        return
    assert where != "body" and depth <= 1024
    if routes_unchanged(model):
        assert gw.up.raw[-1] == raw
    else:
        assert orjson.loads(gw.up.raw[-1]) == reencoded(orjson.loads(raw))


@pytest.mark.parametrize("model", [ALIAS, "openai/gpt-4o"])
@pytest.mark.parametrize("depth", [255, 1000])
def test_deep_nesting_in_a_reencoded_body_is_not_a_500(gw: Harness, model: str, depth: int):
    raw = (
        orjson.dumps(valid_body("/v1/chat/completions", model))[:-1]
        + b', "deep": '
        + b"[" * depth
        + b"]" * depth
        + b"}"
    )
    ans = gw.request(b"POST", b"/v1/chat/completions", [], raw)
    assert check_error(ans, 400)["message"].startswith("The request body nests deeper")
    check_request_id(ans)


@FUZZ
@given(
    path=st.sampled_from(POST_PATHS),
    model=st.sampled_from(["gpt-4o-mini", ALIAS]),
    size=st.integers(0, 300_000) | st.integers(MAX_BODY - 200, MAX_BODY + 200),
    char=st.sampled_from(["x", "é", "\u2603", '"', "\\", "\x00", "\U0001f600"]),
)
def test_huge_strings_are_answered_or_413(gw: Harness, path: str, model: str, size: int, char: str):
    body = valid_body(path, model)
    if path == "/v1/chat/completions":
        body["messages"][0]["content"] = char * size
    else:
        body[REQUIRED[path]] = char * size
    raw = orjson.dumps(body)
    ans = note(gw.request(b"POST", path.encode(), [], raw))
    check_request_id(ans)
    if len(raw) > MAX_BODY:
        assert check_error(ans, 413)["code"] == "request_too_large"
    else:
        check_answer(ans, path, stream=False)
        if model != ALIAS:
            assert gw.up.raw[-1] == raw


@FUZZ
@given(
    path=st.sampled_from(POST_PATHS),
    junk=st.binary(min_size=1, max_size=8).filter(lambda b: not _is_utf8(b)),
    at=st.floats(0, 1),
)
def test_invalid_utf8_is_a_400(gw: Harness, path: str, junk: bytes, at: float):
    raw = orjson.dumps(valid_body(path, extra_text="some text here"))
    start = raw.index(b"some text here")
    pos = start + int(at * len("some text here"))
    seen = len(gw.up.raw)
    ans = note(gw.request(b"POST", path.encode(), [], raw[:pos] + junk + raw[pos:]))
    check_error(ans, 400)
    check_request_id(ans)
    assert len(gw.up.raw) == seen


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# -- headers -------------------------------------------------------------------------

_ID_INJECTIONS = [
    b"abc\r\nSet-Cookie: injected=1",
    b"abc\r\nInjected: 1",
    b"abc\rInjected: 1",
    b"abc\nInjected: 1",
    b"abc\r\n\r\nHTTP/1.1 200 OK",
    b"a\x00b",
    b"a" * 128,
    b"a" * 129,
    b"a" * 8000,
    b"a" * 9000,
    "\u2603-snow".encode(),
    "caf\xe9".encode("latin-1"),
    b"\xff\xfe",
    b"  padded  ",
    b"ok-id_1.2:3",
    b"../../etc/passwd",
    b"<script>alert(1)</script>",
    b"",
]


@FUZZ
@given(
    rid=st.one_of(
        st.sampled_from(_ID_INJECTIONS),
        st.binary(max_size=200),
        st.text(st.characters(codec="ascii", categories=("L", "N", "P", "S")), max_size=200).map(
            str.encode
        ),
        st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=60).map(str.encode),
    ),
    twice=st.booleans(),
    path=st.sampled_from(POST_PATHS),
)
def test_x_request_id_is_always_safe(gw: Harness, rid: bytes, twice: bool, path: str):
    headers = [(b"x-request-id", rid)] + ([(b"X-Request-Id", b"second")] if twice else [])
    seen = len(gw.up.raw)
    ans = note(gw.request(b"POST", path.encode(), headers, orjson.dumps(valid_body(path))))
    if is_protocol_reject(ans):
        check_protocol_reject(ans)
        assert len(gw.up.raw) == seen
        return
    # A CRLF ends the header line: what follows is another header (or the body).
    effective = rid.split(b"\r\n")[0]
    check_request_id(ans, effective)
    if effective != rid and ans.status != 200:
        check_error(ans)  # the "injection" broke the request apart: a clean 400
        return
    check_answer(ans, path, stream=False)
    # the upstream sees the same id as the client
    upstream = {k.lower(): v for k, v in gw.up.headers[-1].items()}
    assert upstream["x-request-id"].encode() == ans.header(b"x-request-id")[0]


_header_names = st.sampled_from(
    [
        b"Content-Type",
        b"Accept",
        b"Accept-Encoding",
        b"Authorization",
        b"x-gateway-timeout",
        b"x-request-id",
        b"Cookie",
        b"X-Forwarded-For",
        b"OpenAI-Organization",
        b"x-custom",
    ]
)
_header_values = st.one_of(
    # CR and LF end a header line: test_x_request_id_is_always_safe covers them
    st.binary(max_size=100).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from(
        [
            b"application/json",
            b"text/plain; charset=latin-1",
            b"gzip, br",
            b"Bearer sk-client",
            b"Bearer \xff\xfe",
            b"nan",
            b"inf",
            b"-1",
            b"0",
            b"1e-300",
            b"1e309",
            b"0x10",
            b"30",
        ]
    ),
)


@FUZZ
@given(
    headers=st.lists(
        st.tuples(_header_names, _header_values) | st.just((b"Expect", b"100-continue")),
        max_size=5,
    ),
    path=st.sampled_from(POST_PATHS + GET_PATHS),
)
def test_hostile_headers_on_every_endpoint(
    gw: Harness, headers: list[tuple[bytes, bytes]], path: str
):
    post = path in POST_PATHS
    body = orjson.dumps(valid_body(path)) if post else b""
    ans = note(gw.request(b"POST" if post else b"GET", path.encode(), headers, body))
    if is_protocol_reject(ans):
        check_protocol_reject(ans)
        return
    assert ans.status != 500, ans.body[:500]
    rid = next((v for n, v in headers if n.lower() == b"x-request-id"), None)
    check_request_id(ans, rid)
    if ans.status == 200:
        if post:
            check_answer(ans, path, stream=False)
        else:
            check_no_leak(ans)
        return
    timeout = [v for n, v in headers if n == b"x-gateway-timeout"]
    if ans.status == 504:  # a deadline too short to reach the upstream, as asked
        assert post and timeout and float(timeout[0]) < 0.01
        check_error(ans, 504)
    else:
        assert check_error(ans, 400)["code"] == "invalid_timeout"


@pytest.mark.parametrize("expect", [b"\x80", b"\xff\xfe", b"something-else"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models"])
def test_unknown_expect_header_is_a_clean_4xx(gw: Harness, expect: bytes, path: str):
    post = path in POST_PATHS
    body = orjson.dumps(valid_body(path)) if post else b""
    ans = gw.request(b"POST" if post else b"GET", path.encode(), [(b"Expect", expect)], body)
    check_error(ans, 417)
    check_request_id(ans)


# -- GET endpoints and methods -------------------------------------------------------


_query = st.one_of(
    st.binary(max_size=60).map(lambda b: quote_from_bytes(b, safe="=&/?:@!$'()*+,;").encode()),
    st.sampled_from([b"a=1&a=2", b"model=x%00y", b"%zz", b"x=%ff%fe", b"=&=&", b"a" * 9000]),
)


@FUZZ
@given(
    path=st.sampled_from(GET_PATHS + POST_PATHS + ("/", "/v1", "/admin", "/v1/models/x")),
    method=st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]),
    query=_query,
    body=st.binary(max_size=100),
)
def test_every_endpoint_and_method(
    gw: Harness, path: str, method: bytes, query: bytes, body: bytes
):
    target = path.encode() + (b"?" + query if query else b"")
    ans = note(gw.request(method, target, [], body))
    if is_protocol_reject(ans):  # a query aiohttp's URL parser refuses
        check_protocol_reject(ans)
        return
    assert ans.status < 500 or (path == "/readyz" and ans.status == 503), ans.body[:500]
    check_request_id(ans)
    if method == b"HEAD":
        assert ans.body == b""
        return
    if path in GET_PATHS and method == b"GET":
        assert ans.status == 200, ans.body[:500]
        check_no_leak(ans)
    elif path in POST_PATHS and method == b"POST":
        assert ans.status in (200, 400)
        if ans.status == 400:
            check_error(ans, 400)
    else:
        check_error(ans, (404, 405))


# -- access control ----------------------------------------------------------------------


def test_non_utf8_bearer_token_is_a_401(locked: Harness):
    path = "/v1/chat/completions"
    headers = [(b"Authorization", b"Bearer \xff\xfe")]
    ans = locked.request(b"POST", path.encode(), headers, orjson.dumps(valid_body(path)))
    check_error(ans, 401)


@FUZZ
@given(
    path=st.sampled_from(POST_PATHS + GET_PATHS),
    auth=st.one_of(
        st.none(),
        # printable UTF-8 tokens; non-UTF-8 ones have their own test below
        st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=60).map(
            lambda s: b"Bearer " + s.encode()
        ),
        st.sampled_from(
            [
                b"Bearer",
                b"Bearer ",
                b"bearer " + CLIENT_KEY.encode(),
                CLIENT_KEY.encode(),
                b"Basic " + CLIENT_KEY.encode(),
                b"Bearer " + CLIENT_KEY.encode() + b"x",
                b"Bearer " + CLIENT_KEY.encode()[:-1],
                b"Bearer  " + CLIENT_KEY.encode(),
                b"Bearer " + ADMIN_KEY.encode(),
                b"Bearer " + CLIENT_KEY.encode(),
            ]
        ),
    ),
)
def test_keys_are_checked_on_every_endpoint(locked: Harness, path: str, auth: bytes | None):
    post = path in POST_PATHS
    headers = [(b"Authorization", auth)] if auth is not None else []
    body = orjson.dumps(valid_body(path)) if post else b""
    seen = len(locked.up.raw)
    ans = note(locked.request(b"POST" if post else b"GET", path.encode(), headers, body))
    check_request_id(ans)
    token = auth.partition(b" ")[2].strip() if auth and auth[:7].lower() == b"bearer " else None
    admin = path.startswith(("/admin/", "/metrics"))
    if path in ("/healthz", "/readyz"):
        allowed = True
    elif admin:
        allowed = token == ADMIN_KEY.encode()
    else:
        allowed = token == CLIENT_KEY.encode()
    if allowed:
        assert ans.status == 200, ans.body[:500]
        check_no_leak(ans)
    else:
        err = check_error(ans, 401)
        assert err["code"] == "invalid_api_key"
        assert len(locked.up.raw) == seen
        for secret in (CLIENT_KEY, ADMIN_KEY):
            assert secret.encode() not in ans.body
