"""Access control, secrets that never leak, TLS verification, targets only from config."""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import ssl
import subprocess
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.auth import AccessPolicy, auth_middleware, digest
from gateway.config import load_settings
from tests import fake_upstream as fu
from tests.conftest import PROVIDER_KEY, chat

CLIENT_KEY = "gw-client-key-abcdef0123456789"
ADMIN_KEY = "gw-admin-key-9876543210fedcba"


def policy(**kw):
    return AccessPolicy(frozenset({digest(CLIENT_KEY)}), digest(ADMIN_KEY), **kw)


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


async def test_client_keys_are_required(gateway, upstreams):
    a = await upstreams("a")
    client = await gateway(a, settings={"access": policy()})
    for headers in ({}, bearer("wrong"), {"Authorization": CLIENT_KEY}):
        resp = await client.post("/v1/chat/completions", json=chat(), headers=headers)
        assert resp.status == 401
        err = (await resp.json())["error"]
        assert err["code"] == "invalid_api_key"
        assert "wrong" not in err["message"]
    assert a.requests == []  # a denied request never reaches an upstream
    resp = await client.post("/v1/chat/completions", json=chat(), headers=bearer(CLIENT_KEY))
    assert resp.status == 200
    # the client's key stays here; the provider gets its own
    assert a.headers[0]["Authorization"] == f"Bearer {PROVIDER_KEY}"


async def test_health_is_open_and_admin_needs_the_admin_key(gateway, upstreams):
    a = await upstreams("a")
    client = await gateway(a, settings={"access": policy()})
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    for path in ("/metrics", "/admin/providers"):
        assert (await client.get(path)).status == 401
        assert (await client.get(path, headers=bearer(CLIENT_KEY))).status == 401
        assert (await client.get(path, headers=bearer(ADMIN_KEY))).status == 200


async def test_admin_loopback_only():
    handler = mock.AsyncMock(return_value=web.Response(text="ok"))
    check = auth_middleware(AccessPolicy(admin_loopback_only=True))

    def request(path, peer):
        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda name, default=None: (
            peer if name == "peername" else default
        )
        return make_mocked_request("GET", path, transport=transport)

    assert (await check(request("/metrics", ("127.0.0.1", 5000)), handler)).status == 200
    assert (await check(request("/admin/providers", ("::1", 5000, 0, 0)), handler)).status == 200
    assert (await check(request("/metrics", ("192.0.2.7", 5000)), handler)).status == 403
    assert (await check(request("/v1/models", ("192.0.2.7", 5000)), handler)).status == 200


def test_keys_from_env_and_hashed_file(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# team A\n{hashlib.sha256(b'file-key').hexdigest()}  # laptop\n\n")
    s = load_settings(
        {
            "GATEWAY_API_KEYS": "k1, k2",
            "GATEWAY_API_KEYS_FILE": str(keys),
            "GATEWAY_ADMIN_KEY": "adm",
        }
    )
    assert s.access.client_keys == {digest("k1"), digest("k2"), digest("file-key")}
    assert s.access.admin_key == digest("adm")
    assert "k1" not in repr(s) and digest("k1") not in repr(s)
    keys.write_text("not-a-digest\n")
    with pytest.raises(ValueError, match="api_keys_file: line 1"):
        load_settings({"GATEWAY_API_KEYS_FILE": str(keys)})


async def test_no_secret_reaches_logs_metrics_errors_or_admin(gateway, upstreams, caplog):
    a, b = await upstreams("a"), await upstreams("b")
    a.then(
        fu.openai_error(
            401,
            f"Incorrect API key provided: {PROVIDER_KEY[:8]}",
            "invalid_request_error",
            "invalid_api_key",
        )
    )
    b.default = fu.drop_after(2)
    client = await gateway(a, b, settings={"access": policy()})
    seen = []
    with caplog.at_level(logging.DEBUG):
        for body in (chat(), chat(stream=True), {"model": 1}):
            resp = await client.post("/v1/chat/completions", json=body, headers=bearer(CLIENT_KEY))
            seen.append(await resp.text())
        resp = await client.post(
            "/v1/chat/completions", json=chat(), headers=bearer("guess-" + CLIENT_KEY)
        )
        seen.append(await resp.text())
        for path in ("/metrics", "/admin/providers", "/v1/models", "/readyz"):
            resp = await client.get(path, headers=bearer(ADMIN_KEY))
            seen.append(await resp.text())
            seen.append(str(dict(resp.headers)))
    everything = "\n".join(seen) + caplog.text
    for secret in (CLIENT_KEY, ADMIN_KEY, PROVIDER_KEY, digest(CLIENT_KEY), digest(ADMIN_KEY)):
        assert secret not in everything


async def test_target_comes_only_from_configuration(gateway, upstreams):
    a = await upstreams("a")
    client = await gateway(a)
    body = chat(base_url="http://203.0.113.9/v1", api_base="http://203.0.113.9")
    headers = {
        "Host": "203.0.113.9",
        "X-Forwarded-Host": "203.0.113.9",
        "X-Upstream": "http://203.0.113.9",
    }
    resp = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert resp.status == 200
    assert len(a.requests) == 1  # it went to the configured provider, fields untouched
    assert a.requests[0]["base_url"] == "http://203.0.113.9/v1"


@pytest.fixture
def tls_upstream_ctx(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command (apt-get install openssl)")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def test_upstream_tls_is_verified_by_default(
    gateway, upstreams, tls_upstream_ctx, aiohttp_server
):
    served = []

    async def answer(request):
        served.append(1)
        return web.json_response(fu.completion("over tls", "m"))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    server = await aiohttp_server(app, ssl=tls_upstream_ctx)
    url = f"https://127.0.0.1:{server.port}/v1"
    b = await upstreams("b")
    client = await gateway(url, b)
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.headers["x-gateway-provider"] == "lmstudio"  # self-signed: refused, failed over
    assert served == []
    client = await gateway(url, b, per={"openai": {"verify_tls": False}})
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.headers["x-gateway-provider"] == "openai"


async def status_from(app, path, peer, headers=None):
    """Send ``GET path`` through ``app``'s middlewares and handler as if from ``peer``
    (tests reach the gateway only over loopback, so a remote peer is simulated)."""
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        peer if name == "peername" else default
    )
    request = make_mocked_request("GET", path, headers=headers or {}, transport=transport, app=app)
    handler = (await app.router.resolve(request)).handler
    for middleware in reversed(app.middlewares):
        handler = functools.partial(middleware, handler=handler)
    return (await handler(request)).status


REMOTE, LOCAL = ("192.0.2.7", 5000), ("127.0.0.1", 5000)


async def test_admin_is_loopback_only_without_an_admin_key(gateway, upstreams):
    """The default: /admin/* shows the providers' URLs and state to loopback only."""
    a = await upstreams("a")
    app = (await gateway(a)).server.app
    assert await status_from(app, "/admin/providers", REMOTE) == 403
    assert await status_from(app, "/admin/providers", ("::1", 5000, 0, 0)) == 200
    assert await status_from(app, "/admin/providers", LOCAL) == 200
    # /metrics stays reachable: Prometheus scrapes from another host or container
    assert await status_from(app, "/metrics", REMOTE) == 200
    assert await status_from(app, "/healthz", REMOTE) == 200

    with_client_keys = (await gateway(a, settings={"access": policy_without_admin()})).server.app
    assert (
        await status_from(with_client_keys, "/admin/providers", REMOTE, bearer(CLIENT_KEY)) == 403
    )
    assert await status_from(with_client_keys, "/admin/providers", LOCAL, bearer(CLIENT_KEY)) == 200
    assert await status_from(with_client_keys, "/admin/providers", LOCAL) == 401


async def test_admin_key_opens_admin_to_other_hosts(gateway, upstreams):
    a = await upstreams("a")
    app = (await gateway(a, settings={"access": policy()})).server.app
    assert await status_from(app, "/admin/providers", REMOTE, bearer(ADMIN_KEY)) == 200
    assert await status_from(app, "/admin/providers", REMOTE, bearer(CLIENT_KEY)) == 401
    assert await status_from(app, "/admin/providers", REMOTE) == 401
    strict = (await gateway(a, settings={"access": policy(admin_loopback_only=True)})).server.app
    assert await status_from(strict, "/admin/providers", REMOTE, bearer(ADMIN_KEY)) == 403
    assert await status_from(strict, "/metrics", REMOTE, bearer(ADMIN_KEY)) == 403
    assert await status_from(strict, "/admin/providers", LOCAL, bearer(ADMIN_KEY)) == 200


async def test_status_page_is_guarded_like_admin(gateway, upstreams):
    """Loopback only without an admin key; with one, the page (a sign-in form, no data) is
    served to any peer and the data takes the key (or the session cookie it buys)."""
    a = await upstreams("a")
    data = ("/status.json", "/status/session")
    keyless = (await gateway(a)).server.app
    for path in ("/status", *data):
        assert await status_from(keyless, path, REMOTE) == 403
        assert await status_from(keyless, path, LOCAL) in (200, 204)
    keyed = (await gateway(a, settings={"access": policy()})).server.app
    assert await status_from(keyed, "/status", REMOTE) == 200
    for path in data:
        assert await status_from(keyed, path, REMOTE) == 401
        assert await status_from(keyed, path, REMOTE, bearer(CLIENT_KEY)) == 401
        assert await status_from(keyed, path, REMOTE, bearer(ADMIN_KEY)) in (200, 204)
    client_keys_only = (await gateway(a, settings={"access": policy_without_admin()})).server.app
    assert await status_from(client_keys_only, "/status.json", REMOTE, bearer(CLIENT_KEY)) == 403
    assert await status_from(client_keys_only, "/status.json", LOCAL) == 401
    assert await status_from(client_keys_only, "/status.json", LOCAL, bearer(CLIENT_KEY)) == 200
    strict = (await gateway(a, settings={"access": policy(admin_loopback_only=True)})).server.app
    for path in ("/status", *data):
        assert await status_from(strict, path, REMOTE, bearer(ADMIN_KEY)) == 403
    assert await status_from(strict, "/status.json", LOCAL, bearer(ADMIN_KEY)) == 200


def policy_without_admin():
    return AccessPolicy(frozenset({digest(CLIENT_KEY)}))
