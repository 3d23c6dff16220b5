"""Running more than one: the Kubernetes manifests (deploy/kubernetes/, checked offline
against the Kubernetes API schemas that the PyPI package kubernetes-validate ships) and
docker-compose.yml's "scale" profile (checked with the real Compose binary)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import load_settings
from tests.conftest import ROOT, compose, needs_compose, resolved, user_project

KUBERNETES = ROOT / "deploy" / "kubernetes"
#: The oldest Kubernetes the manifests are for (autoscaling/v2, policy/v1 and the rest),
#: and the newest the schemas know.
VERSIONS = ("1.28.0", None)

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install -e '.[test]' (kubernetes-validate)"
)


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """Every document of every manifest, with its file's name."""
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def resource(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v or "newest")
def test_manifests_match_the_kubernetes_schemas(version):
    version = version or kubernetes_validate.latest_version()
    for name, doc in manifests():
        # strict: a misspelt or misplaced field is an error, not silently ignored
        kubernetes_validate.validate(doc, version, strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"].startswith("llm-gateway"), name


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    kinds = {d["kind"] for _, d in manifests()}
    wanted = {"Deployment", "Service", "ConfigMap", "Secret"}
    assert kinds >= wanted | {"HorizontalPodAutoscaler", "PodDisruptionBudget"}


def test_the_deployment_probes_drains_and_shares(tmp_path):
    deployment = resource("Deployment", "llm-gateway")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    port = container["ports"][0]
    assert (port["name"], port["containerPort"]) == ("http", 8080)
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GATEWAY_PORT"] == "8080" and env["GATEWAY_HOST"] == "0.0.0.0"

    # The TOML in the ConfigMap is a configuration the gateway accepts, mounted where
    # GATEWAY_CONFIG points.
    config = resource("ConfigMap", "llm-gateway-config")
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == "llm-gateway-config"
    (file_name,) = config["data"]
    assert env["GATEWAY_CONFIG"] == f"{mount['mountPath']}/{file_name}"
    toml = tmp_path / file_name
    toml.write_text(config["data"][file_name])
    settings = load_settings({**env, "GATEWAY_CONFIG": str(toml), "OPENAI_API_KEY": "sk-x"})
    assert settings.shared_redis == env["REDIS_URL"]

    # The drain fits: the preStop pause, then shutdown_grace, within the pod's grace.
    pause = re.search(
        r"sleep\((\d+)\)", " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    )
    grace = tomllib.loads(config["data"][file_name])["gateway"]["shutdown_grace"]
    assert settings.shutdown_grace == grace
    termination = pod["spec"]["terminationGracePeriodSeconds"]
    assert int(pause[1]) + grace + 5 <= termination, "SIGKILL would cut the drain short"

    # Keys come from the Secret; Redis is the manifests' own Service.
    (source,) = container["envFrom"]
    secret = resource("Secret", source["secretRef"]["name"])
    assert set(secret["stringData"]) >= {"OPENAI_API_KEY", "GATEWAY_API_KEYS", "GATEWAY_ADMIN_KEY"}
    redis_host = re.fullmatch(r"redis://([\w-]+):(\d+)/0", env["REDIS_URL"])
    redis_service = resource("Service", redis_host[1])
    assert redis_service["spec"]["ports"][0]["port"] == int(redis_host[2])
    redis_pods = resource("Deployment", redis_host[1])["spec"]["template"]["metadata"]["labels"]
    assert redis_service["spec"]["selector"].items() <= redis_pods.items()

    # Prometheus scrapes each pod on its own, where /metrics is.
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert (notes["prometheus.io/port"], notes["prometheus.io/path"]) == ("8080", "/metrics")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_service_autoscaler_and_budget_point_at_the_gateway():
    labels = resource("Deployment", "llm-gateway")["spec"]["template"]["metadata"]["labels"]
    service = resource("Service", "llm-gateway")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    hpa = resource("HorizontalPodAutoscaler", "llm-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "llm-gateway",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = resource("PodDisruptionBudget", "llm-gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]


@needs_compose
def test_compose_scale_profile(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    compose("--profile", "scale", "config", "-q", env_file=empty)
    services = json.loads(
        compose("--profile", "scale", "config", "--format", "json", env_file=empty)
    )["services"]
    replicas, nginx, redis = services["gateway-replica"], services["nginx"], services["redis"]
    assert replicas["deploy"]["replicas"] == 3
    assert replicas["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert not replicas.get("ports") and not redis.get("ports")  # only through nginx
    # The replicas get the single gateway's settings, and Redis besides.
    single = services["gateway"]["environment"]
    assert {k: v for k, v in replicas["environment"].items() if k != "REDIS_URL"} == single
    assert [(p["host_ip"], p["target"]) for p in nginx["ports"]] == [("127.0.0.1", 8080)]
    (mount,) = nginx["volumes"]
    conf = Path(mount["source"]).read_text()
    assert mount["target"] == "/etc/nginx/nginx.conf"
    assert re.search(r"server gateway-replica:8080 resolve;", conf)
    assert re.search(r"listen 8080;", conf)
    assert "proxy_buffering off;" in conf  # streams pass as they come

    # As a user runs it: keys go to the gateways only, every port on loopback.
    project = user_project(tmp_path, "OPENAI_API_KEY=sk-openai-secret-in-dotenv\n")
    (project / "deploy").mkdir()
    services = resolved(project, "--profile", "scale")
    for name, service in services.items():
        text = json.dumps(service)
        gateway = name in ("gateway", "gateway-replica")
        assert gateway == ("sk-openai-secret-in-dotenv" in text), name
        for published in service.get("ports", []):
            assert published["host_ip"] == "127.0.0.1", name
        if "build" not in service:
            tag = service["image"].rpartition(":")[2]
            assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {service['image']}"
