"""The deployment assets in deploy/: the Ray Serve configuration and the KubeRay RayService validate with Ray Serve's
own schema and build a real gateway application from the cluster's tpgate configuration; Prometheus scrapes the
gateway, the engines and Ray; every query of the Grafana dashboard names metrics and labels the gateway and the
engines really export."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from gateway.config import load_config
from gateway.dataplane.auth import secret_digest
from gateway.dataplane.metrics import GatewayMetrics
from gateway.engines import metric_names

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KEYS = {"TPGATE_KEY_INTERACTIVE": "sk-cluster-interactive", "TPGATE_KEY_BATCH": "sk-cluster-batch"}


def serve_config() -> dict:
    return yaml.safe_load((DEPLOY / "serve-cluster.yaml").read_text())


def rayservice() -> dict:
    return yaml.safe_load((DEPLOY / "kuberay-rayservice.yaml").read_text())


def test_the_serve_config_validates_with_ray_serves_schema_and_names_the_builder():
    schema = ServeDeploySchema.model_validate(serve_config())
    (app,) = schema.applications
    module, _, name = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), name)
    assert builder.__module__ == "gateway.cluster.serve_app" and callable(builder)
    assert Path(app.args["config"]).name == "tpgate.cluster.yaml" and app.route_prefix == "/"


def test_the_rayservice_carries_the_same_serve_config_and_ray_token_authentication():
    manifest = rayservice()
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    assert embedded == serve_config()
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        env = {item["name"]: item for item in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN_PATH"]["value"] == "/etc/tpgate/secrets/ray-token"
        assert all("valueFrom" in env[name] for name in KEYS)  # API keys come from a Secret, never literal
    workers = cluster["workerGroupSpecs"][0]
    assert workers["rayStartParams"]["num-gpus"] == "8"
    config = load_config(DEPLOY / "tpgate.cluster.yaml")
    assert config.gpus_per_node == 8 and config.gpus == 8 * workers["replicas"]


def test_the_builder_builds_the_gateway_from_the_cluster_configuration(tmp_path, monkeypatch):
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    # paths of the cluster's mounts, moved to this machine; the model card instead of the model directory
    monkeypatch.setenv("TPGATE_MODEL", "internvl2_5-38b")
    monkeypatch.setenv("TPGATE_AUTH__ADMIN_TOKEN_FILE", str(tmp_path / "admin-token"))
    monkeypatch.setenv("TPGATE_STATE_FILE", str(tmp_path / "state.json"))
    from gateway.cluster.serve_app import build

    app = build(serve_config()["applications"][0]["args"] | {"config": str(DEPLOY / "tpgate.cluster.yaml")})
    router = app._bound_deployment
    assert router.name == "router" and router._deployment_config.num_replicas == 2
    settings, keeper = router.init_args
    assert keeper._bound_deployment.name == "control"
    controller_settings, _, initial = keeper._bound_deployment.init_args
    assert controller_settings.model_name == "internvl2_5-38b"
    assert {pool.id: (pool.engine.tp, pool.replicas) for pool in initial.pools.values()} == {
        "interactive-tp4": (4, 2), "batch-tp8": (8, 1)}
    assert all(pool.engine.engine == "lmdeploy" for pool in initial.pools.values())
    assert set(settings.api_key_classes) == {secret_digest(v) for v in KEYS.values()}
    assert settings.admin_token_digest == secret_digest((tmp_path / "admin-token").read_text().strip())
    assert not any(secret in repr(app) + repr(settings) for secret in KEYS.values())


def test_the_builder_names_what_is_missing():
    from gateway.cluster.serve_app import build

    with pytest.raises(ValueError, match="needs args: {config"):
        build({})


def test_prometheus_scrapes_the_gateway_the_engines_and_ray():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"tpgate", "lmdeploy", "ray"}
    (engines,) = jobs["lmdeploy"]["http_sd_configs"]
    assert engines["url"].endswith("/admin/engine-targets") and engines["authorization"]["type"] == "Bearer"
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def exported_metrics() -> dict[str, set[str]]:
    """Sample name -> labels, for every metric a router exports (declared in gateway/dataplane/metrics.py) and
    every LMDeploy engine metric (with the labels Prometheus adds from the engine targets)."""
    registry = GatewayMetrics().registry
    found: dict[str, set[str]] = {}
    for collector in set(registry._names_to_collectors.values()):
        labels = set(collector._labelnames)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
        for family in collector.describe():
            for suffix in suffixes[family.type]:
                found[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    engine_labels = set(metric_names.LABELS) | {"pool", "replica", "tp", "instance", "job"}
    for name in vars(metric_names).values():
        if isinstance(name, str) and name.startswith(metric_names.PREFIX) and name != metric_names.PREFIX:
            for suffix in ("", "_bucket", "_sum", "_count"):
                found[name + suffix] = engine_labels | {metric_names.FINISHED_REASON_LABEL, "le"}
    return found


METRIC = re.compile(r"\b(tpgate_[a-z_]+|lmdeploy:[a-z_]+)")
GROUPING = re.compile(r"\bby \(([^)]*)\)")
SELECTOR_LABELS = re.compile(r"\{([^}]*)\}")


def test_every_dashboard_query_names_exported_metrics_and_labels():
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exported = exported_metrics()
    queries = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(queries) >= 15
    used = set()
    for title, expr in queries:
        names = METRIC.findall(expr)
        assert names, f"{title}: no tpgate or lmdeploy metric in {expr}"
        for name in names:
            assert name in exported, f"{title}: {name} is not exported"
            used.add(name)
        labels = {label.strip() for group in GROUPING.findall(expr) for label in group.split(",")}
        labels |= {m.split("=")[0].strip() for sel in SELECTOR_LABELS.findall(expr) for m in sel.split(",") if m}
        labels.discard("")
        allowed = set.intersection(*(exported[name] for name in names))
        assert labels <= allowed, f"{title}: labels {labels - allowed} are not on {names}"
    # what an operator needs to see: per-class latency, throughput and goodput; routes and weights; pools;
    # state changes (promotions and rollbacks)
    assert {"tpgate_time_to_first_token_seconds_bucket", "tpgate_time_per_output_token_seconds_bucket",
            "tpgate_output_tokens_total", "tpgate_slo_met_requests_total", "tpgate_route_weight_ratio",
            "tpgate_pool_replicas", "tpgate_state_version"} <= used
