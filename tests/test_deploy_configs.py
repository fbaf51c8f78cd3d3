"""The deployment files, checked offline in a few seconds: compose.yaml and its podman
override, the collector, Prometheus, HAProxy and Grafana configs, the dashboard's queries
against the metric names the code exports, and the Kubernetes manifests (kustomize base and
GPU overlay) against the Kubernetes schemas. tests/test_compose_stack.py runs them for real."""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from gateway.main import GatewayConfig
from inflight.flags import _env, _fields
from worker.main import WorkerConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33"  # checked against this Kubernetes release's schemas, strict (no unknown fields)


def _load(path: Path):
    # podman-compose's and docker compose's !reset / !override tags, read as plain values
    class Loader(yaml.SafeLoader):
        pass

    for tag in ("!reset", "!override"):
        Loader.add_constructor(tag, lambda loader, node: (
            loader.construct_mapping(node) if isinstance(node, yaml.MappingNode)
            else loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
            else loader.construct_scalar(node)))
    return yaml.load(path.read_text(), Loader=Loader)


COMPOSE = _load(ROOT / "compose.yaml")
SERVICES = COMPOSE["services"]
INFLIGHT_SERVICES = {name: s for name, s in SERVICES.items() if s.get("command", [None])[0] == "inflight"}


def exported_metrics() -> dict[str, str]:
    """Every metric the code registers with prometheus_client: {name: Counter|Gauge|Histogram}."""
    found = {}
    for package in ("inflight", "gateway", "scheduler", "worker"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("Counter", "Gauge", "Histogram", "Summary")
                        and node.args and isinstance(node.args[0], ast.Constant)
                        and str(node.args[0].value).startswith("inflight_")):
                    found[node.args[0].value] = node.func.attr
    return found


def series_names(metric: str, kind: str) -> set[str]:
    """What prometheus_client exposes for one metric (the _created series are left out)."""
    base = metric.removesuffix("_total")
    return {"Counter": {base + "_total"}, "Gauge": {metric},
            "Histogram": {metric + "_bucket", metric + "_sum", metric + "_count"},
            "Summary": {metric, metric + "_sum", metric + "_count"}}[kind]


def env_names() -> set[str]:
    """Every INFLIGHT_* variable a process reads (inflight/flags.py), and the few read directly."""
    from cli.serve import ServeConfig
    from gateway.main import GatewayConfig
    from scheduler.config import SchedulerConfig
    from worker.main import WorkerConfig

    names = {"INFLIGHT_CACHE", "INFLIGHT_GC_SETTLE"}
    for cls in (GatewayConfig, SchedulerConfig, WorkerConfig, ServeConfig):
        names |= {_env(flag) for _, flag, _, _ in _fields(cls)}
    return names


def test_exported_metrics_found():
    metrics = exported_metrics()
    # one of each process's, so a change in how they are registered cannot empty the checks below
    for name in ("inflight_gateway_time_to_first_token_seconds", "inflight_scheduler_requests_queued",
                 "inflight_worker_engine_steps"):
        assert name in metrics


def test_dashboard_queries_name_exported_metrics():
    dashboard = json.loads((DEPLOY / "grafana/dashboards/inflight.json").read_text())
    exposed = set().union(*(series_names(m, k) for m, k in exported_metrics().items()))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        names = re.findall(r"\binflight_[a-z0-9_]+", expr)
        assert names, expr
        for name in names:
            assert name in exposed, f"dashboard query uses {name}, which no process exports: {expr}"
    # the panels the issue asks for
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for want in ("first token", "inter-token", "throughput", "queue depth", "kv cache usage per worker",
                 "prefix-cache hit rate per worker", "errors by code", "engine steps by mode"):
        assert want in titles
    # every panel reads the provisioned data source
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid


def test_grafana_provisioning_matches_compose_mounts():
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/inflight.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = dict(v.split(":")[:2] for v in SERVICES["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == path
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == path + "/inflight.json"


def test_compose_services_healthy_and_configured_by_variables_the_code_reads():
    known = env_names()
    assert {"scheduler", "worker", "gateway", "gateway-lb", "otel-collector", "jaeger", "prometheus",
            "grafana", "worker-gpu-0", "worker-trtllm"} <= set(SERVICES)
    for name, service in SERVICES.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dep, how in (service.get("depends_on") or {}).items():
            assert dep in SERVICES
            assert how == {"condition": "service_healthy"}, f"{name} -> {dep}"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"
    for name, service in INFLIGHT_SERVICES.items():
        env = service["environment"]
        for var in env:
            if var.startswith("INFLIGHT_"):
                assert var in known, f"{name} sets {var}, which nothing reads"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
        assert "cache:/cache" in service["volumes"]
        # Stopping waits out a drain (gateway and worker --drain-timeout), as the k8s manifests do.
        grace = service["stop_grace_period"]
        assert grace.endswith("s") and int(grace[:-1]) > max(GatewayConfig.drain_timeout, WorkerConfig.drain_timeout), name
    assert SERVICES["gateway"]["deploy"]["replicas"] == 2
    assert "gpu" in SERVICES["worker-gpu-0"]["profiles"]
    assert SERVICES["worker-gpu-0"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "profiles" not in SERVICES["worker"]
    assert SERVICES["worker-trtllm"]["profiles"] == ["trtllm"]


def metrics_ports() -> dict[str, int]:
    return {name: int(s["environment"]["INFLIGHT_METRICS_PORT"]) for name, s in INFLIGHT_SERVICES.items()}


def test_prometheus_scrapes_every_process():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for host in sd["names"]:
                targets[host] = sd["port"]
    for name, port in metrics_ports().items():
        if name == "worker-trtllm":  # its own profile; add its name to the worker job to scrape it
            continue
        assert targets.get(name) == port, f"Prometheus does not scrape {name}:{port}"
    assert len({j["job_name"] for j in config["scrape_configs"]}) == len(config["scrape_configs"])


def test_collector_pipeline_and_endpoints():
    config = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    service = config["service"]
    for pipeline in service["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for name in pipeline.get(kind, []):
                assert name in config[kind], f"pipeline names {kind} {name}, which is not defined"
    assert set(service["extensions"]) <= set(config["extensions"])
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    assert config["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"


def test_load_balancer_fronts_the_gateways():
    cfg = (DEPLOY / "haproxy.cfg").read_text()
    listen_port = SERVICES["gateway"]["environment"]["INFLIGHT_LISTEN"].rsplit(":", 1)[1]
    assert re.search(rf"server-template \w+ \d+ gateway:{listen_port}\b", cfg)
    assert re.search(rf"bind :{listen_port}\b", cfg)
    assert any(p.endswith(f":{listen_port}") for p in SERVICES["gateway-lb"]["ports"])
    assert "ports" not in SERVICES["gateway"]  # replicas cannot share a published port


def test_podman_override_replaces_only_what_cannot_be_pulled():
    override = _load(DEPLOY / "podman/compose.override.yaml")
    assert set(override["services"]) <= set(SERVICES)
    assert set(override["services"]) == {"otel-collector", "prometheus", "gateway-lb"}
    collector = override["services"]["otel-collector"]
    assert "otlp_receiver_double.py" in " ".join(collector["command"])


# Kubernetes: kustomize's build, as far as these manifests use it (resources, strategic-merge
# patches, images, labels), then each object against the schemas.

def _merge(into, patch):
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        elif (isinstance(value, list) and isinstance(into.get(key), list)
              and all(isinstance(v, dict) and "name" in v for v in value + into[key])):
            by_name = {v["name"]: v for v in into[key]}
            for v in value:
                if v["name"] in by_name:
                    _merge(by_name[v["name"]], v)
                else:
                    into[key].append(v)
        else:
            into[key] = copy.deepcopy(value)


def _containers(obj):
    return obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


def kustomize(directory: Path) -> list[dict]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects = []
    for resource in k.get("resources", []):
        path = (directory / resource).resolve()
        objects += kustomize(path) if path.is_dir() else [o for o in yaml.safe_load_all(path.read_text()) if o]
    for patch in k.get("patches", []):
        doc = yaml.safe_load((directory / patch["path"]).read_text())
        [target] = [o for o in objects if (o["kind"], o["metadata"]["name"]) == (doc["kind"], doc["metadata"]["name"])]
        _merge(target, doc)
    for image in k.get("images", []):
        for obj in objects:
            for c in _containers(obj):
                if c["image"].split(":")[0] == image["name"]:
                    c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for label in k.get("labels", []):
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
    return objects


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_kubernetes_manifests_valid(overlay):
    objects = kustomize(DEPLOY / "k8s" / overlay)
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    known = env_names()
    ports = {"gateway": 9400, "scheduler": 9401, "worker": 9402}
    for name, port in ports.items():
        deployment = by_kind["Deployment", name]
        pod = deployment["spec"]["template"]
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        [container] = pod["spec"]["containers"]
        assert container["resources"]["requests"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert named[container["readinessProbe"]["httpGet"]["port"]] == port
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["INFLIGHT_METRICS_PORT"] == str(port)
        assert set(env) - known == set(), f"{name} sets variables nothing reads"
        assert pod["spec"]["securityContext"]["runAsNonRoot"]
    assert by_kind["Deployment", "scheduler"]["spec"]["replicas"] == 1
    assert by_kind["HorizontalPodAutoscaler", "gateway"]["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert ("Service", "scheduler") in by_kind and ("Service", "gateway") in by_kind
    config = by_kind["ConfigMap", "inflight-config"]["data"]
    assert {k for k in config if k.startswith("INFLIGHT_")} <= known
    worker = _containers(by_kind["Deployment", "worker"])[0]
    if overlay == "gpu":
        assert worker["image"] == "inflight:cuda"
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert {e["name"]: e["value"] for e in worker["env"]}["INFLIGHT_DEVICE"] == "cuda"
        assert _containers(by_kind["Deployment", "gateway"])[0]["image"] == "inflight:cpu"
    else:
        assert worker["image"] == "inflight:cpu"
        assert "nvidia.com/gpu" not in worker["resources"].get("limits", {})
