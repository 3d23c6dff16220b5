"""The demo serves every endpoint the README lists, and a missing upstream route is
``unsupported``, not ``model_missing``.

Route-level 404s are real ones: an aiohttp app without the route answers ``404: Not Found``
in plain text, exactly as the demo's simulated upstreams did before they had the route.
"""

from __future__ import annotations

import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.config import ProviderConfig, Settings
from gateway.demo import DEMO_MODEL, simulated_upstream, start_demo_upstreams
from gateway.errors import Outcome, classify_response
from gateway.server import create_app
from tests.conftest import chat


def classify(status: int, body: bytes):
    return classify_response(status, body, CIMultiDict())


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        # aiohttp's own 404 for a path it has no route for
        (b"404: Not Found", "404: Not Found"),
        # Go's net/http (Ollama's server) for an unknown path
        (b"404 page not found", "404 page not found"),
        # FastAPI/Starlette (llama.cpp's Python server, vLLM)
        (b'{"detail":"Not Found"}', "404: Not Found"),
        # OpenAI for a path it does not serve
        (
            b'{"error": {"message": "Invalid URL (POST /v1/embeddings)", "type": '
            b'"invalid_request_error", "param": null, "code": null}}',
            "404: Invalid URL (POST /v1/embeddings)",
        ),
        # no body at all
        (b"", "404"),
    ],
)
def test_route_level_404_is_unsupported(body, detail):
    c = classify(404, body)
    assert c.outcome is Outcome.UNSUPPORTED
    assert c.detail == detail  # the status once, not "404: 404: Not Found"


@pytest.mark.parametrize(
    "body",
    [
        b'{"error": {"message": "The model `gpt-9` does not exist or you do not have access '
        b'to it.", "type": "invalid_request_error", "param": null, "code": "model_not_found"}}',
        b'{"error": {"message": "model \\"llama3.2\\" not found, try pulling it first"}}',
        b'{"error": {"message": "Not found", "code": "model_not_found"}}',
    ],
)
def test_404_about_the_model_stays_model_missing(body):
    assert classify(404, body).outcome is Outcome.MODEL_MISSING


def test_status_is_not_repeated_in_other_details():
    c = classify(502, b"502 Bad Gateway")
    assert c.outcome is Outcome.SERVER_ERROR
    assert c.detail == "502 Bad Gateway"


def chat_only_upstream() -> web.Application:
    """An OpenAI-compatible server that has chat completions and nothing else."""

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": DEMO_MODEL}]})

    async def chat_completions(request: web.Request) -> web.Response:
        return web.json_response({"choices": []})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


async def test_gateway_reports_a_missing_route_as_unsupported(aiohttp_client, aiohttp_server):
    upstream = await aiohttp_server(chat_only_upstream())
    settings = Settings(
        providers=(
            ProviderConfig(
                name="lmstudio",
                display_name="LM Studio",
                base_url=str(upstream.make_url("/v1")),
                model=DEMO_MODEL,
            ),
        )
    )
    client = await aiohttp_client(create_app(settings, probes=False))
    resp = await client.post("/v1/embeddings", json={"model": "m", "input": "hi"})
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert error["code"] == "unsupported_endpoint"
    assert error["message"].startswith("No provider serves /v1/embeddings.")
    assert "LM Studio: unsupported (404: Not Found)" in error["message"]
    assert "model_missing" not in error["message"] and "404: 404" not in error["message"]


# --------------------------------------------------------------------------- the demo


@pytest.fixture
async def demo_gateway(aiohttp_client):
    """The gateway routed to the demo's simulated upstreams, as ``--demo`` sets it up."""
    env, runners = await start_demo_upstreams()
    from gateway.config import load_settings

    client = await aiohttp_client(
        create_app(load_settings(env), probes=False),
        server_kwargs={"handler_cancellation": True},
    )
    yield client
    for runner in runners:
        await runner.cleanup()


async def test_demo_serves_completions(demo_gateway):
    resp = await demo_gateway.post(
        "/v1/completions", json={"model": "gpt-4o-mini", "prompt": "Say hi"}
    )
    assert resp.status == 200, await resp.text()
    assert resp.headers["x-gateway-provider"] == "lmstudio"  # the flaky one said 429 first
    assert resp.headers["x-gateway-failover"] == "true"
    body = await resp.json()
    assert body["object"] == "text_completion"
    assert "steady upstream" in body["choices"][0]["text"]
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_demo_streams_completions(demo_gateway):
    resp = await demo_gateway.post(
        "/v1/completions", json={"model": "gpt-4o-mini", "prompt": "Say hi", "stream": True}
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    raw = await resp.text()
    events = [e[len("data: ") :] for e in raw.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == "Hello from the steady upstream: the flaky one was rate limited."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("given", "count"), [("hi", 1), (["hi", "there", "hi"], 3), ([1, 2, 3], 1), ([[1], [2]], 2)]
)
async def test_demo_serves_embeddings(demo_gateway, given, count):
    async def embed() -> list[list[float]]:
        resp = await demo_gateway.post(
            "/v1/embeddings", json={"model": "text-embedding-3-small", "input": given}
        )
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert body["object"] == "list"
        assert [d["index"] for d in body["data"]] == list(range(count))
        return [d["embedding"] for d in body["data"]]

    first, second = await embed(), await embed()
    assert first == second  # the same text, the same vector, whoever answers
    assert all(len(v) == len(first[0]) > 0 for v in first)
    if given == ["hi", "there", "hi"]:
        assert first[0] == first[2] != first[1]


async def test_demo_chat_is_unchanged(demo_gateway):
    resp = await demo_gateway.post("/v1/chat/completions", json=chat())
    assert resp.status == 200
    assert resp.headers["x-gateway-provider"] == "lmstudio"
    body = await resp.json()
    assert body["choices"][0]["message"]["content"] == (
        "Hello from the steady upstream: the flaky one was rate limited."
    )


async def test_demo_upstream_answers_bad_json_with_400(aiohttp_client):
    client = await aiohttp_client(simulated_upstream(flaky=False))
    resp = await client.post("/v1/embeddings", data=b"{oops")
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "invalid_request_error"
