"""Dashboard, alert rules and scrape config use only metrics the running service exports."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

try:
    from deploy_support import DEPLOY, K8S, ROOT, exposed_series_names, load_yaml_docs, promql_metric_names
except ImportError:  # tests/ turned into a package
    from tests.deploy_support import (DEPLOY, K8S, ROOT, exposed_series_names, load_yaml_docs,
                                      promql_metric_names)

ALERTS = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
DASHBOARD = json.loads((DEPLOY / "grafana" / "sr3d-dashboard.json").read_text())
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
# Series Prometheus itself adds to every scrape target.
PROMETHEUS_BUILTINS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def alert_exprs() -> dict[str, str]:
    return {r["alert"]: r["expr"] for g in ALERTS["groups"] for r in g["rules"]}


def dashboard_exprs() -> dict[str, str]:
    return {f"{p['title']}/{t['refId']}": t["expr"] for p in DASHBOARD["panels"] for t in p["targets"]}


def used_names() -> dict[str, set[str]]:
    return {where: promql_metric_names(expr) for where, expr in {**alert_exprs(), **dashboard_exprs()}.items()}


# ------------------------------------------------------------------ the extractor itself
def test_promql_extractor_finds_metrics_and_nothing_else():
    expr = ('histogram_quantile(0.99, sum by (le, stage) (rate(sr3d_stage_duration_seconds_bucket{stage=~"a|b"}'
            '[$__rate_interval]))) > 1e-3 and on (instance) max(sr3d_queue_length) or vector(0)')
    assert promql_metric_names(expr) == {"sr3d_stage_duration_seconds_bucket", "sr3d_queue_length"}
    with pytest.raises(ValueError, match="unclosed"):
        promql_metric_names("sum(rate(x[5m])")


def test_exposition_reader_expands_types_and_keeps_unobserved_metrics():
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    reg = CollectorRegistry()
    Counter("demo_requests_total", "x", ["route"], registry=reg)  # labelled, never observed: no sample line
    Histogram("demo_seconds", "x", registry=reg).observe(0.1)
    names = exposed_series_names(generate_latest(reg).decode())
    assert {"demo_requests_total", "demo_seconds_bucket", "demo_seconds_sum", "demo_seconds_count"} <= names
    assert "demo_requests" not in names and "demo_seconds" not in names


# ------------------------------------------------------------------ names against the service
def _missing(exported: set[str]) -> dict[str, set[str]]:
    exported = exported | PROMETHEUS_BUILTINS
    return {where: names - exported for where, names in used_names().items() if names - exported}


def test_every_used_metric_is_declared_in_service_metrics():
    """The contract module alone (no server): catches a typo even where the service cannot start."""
    from prometheus_client import REGISTRY, generate_latest

    import service.metrics  # noqa: F401  (registers every metric on the default registry)

    assert _missing(exposed_series_names(generate_latest(REGISTRY).decode())) == {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_service(tmp_path_factory) -> str:
    """`sr3d serve` (gateway + embedded worker + embedded Redis) on a free loopback port."""
    if not (ROOT / "service" / "commands" / "serve.py").exists():
        pytest.skip("`sr3d serve` is not implemented yet (service/commands/serve.py missing)")
    port = _free_port()
    data = tmp_path_factory.mktemp("sr3d-data")
    env = {**os.environ, "SR3D_DATA_DIR": str(data), "SR3D_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    for var in ("REDIS_URL", "SR3D_MODEL", "SR3D_API_KEYS"):
        env.pop(var, None)
    log = open(data / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sr3d serve exited with {proc.returncode}:\n{(data / 'serve.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"sr3d serve not healthy in 180 s:\n{(data / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_live_service_exports_every_metric_the_dashboard_and_alerts_use(live_service):
    resp = httpx.get(f"{live_service}/metrics", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    assert _missing(exposed_series_names(resp.text)) == {}


def test_live_service_serves_the_probe_endpoints(live_service):
    assert httpx.get(f"{live_service}/healthz", timeout=5).status_code == 200
    # Ready or not (the worker may still be warming up), /readyz answers, and never with a 5xx other than 503.
    assert httpx.get(f"{live_service}/readyz", timeout=5).status_code in {200, 503}


# ------------------------------------------------------------------ rules and dashboard structure
def test_alert_rules_are_complete():
    rules = [r for g in ALERTS["groups"] for r in g["rules"]]
    assert {"SR3DQueueLagGrowing", "SR3DTimeToFirstTokenP99High", "SR3DDeadLetterQueueNotEmpty",
            "SR3DHighErrorRatio", "SR3DWorkerNotReady"} <= {r["alert"] for r in rules}
    for r in rules:
        assert r["labels"]["severity"] in {"warning", "critical"}
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        assert promql_metric_names(r["expr"])  # every rule looks at something
    from service.schemas import JobStatus

    statuses = set(re.findall(r'sr3d_jobs_finished_total\{status="(\w+)"\}', "".join(alert_exprs().values())))
    assert statuses and statuses <= {s.value for s in JobStatus}


def test_prometheus_rule_crd_carries_the_same_groups():
    (rule,) = [d for d in load_yaml_docs(K8S / "base" / "monitoring.yaml") if d["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == ALERTS["groups"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Prometheus) is not installed")
def test_promtool_checks_config_rules_and_rule_unit_tests(tmp_path: Path):
    prom = DEPLOY / "prometheus"
    subprocess.run(["promtool", "check", "rules", str(prom / "alerts.yml")], check=True, capture_output=True)
    subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=prom, check=True, capture_output=True)
    # The config names the rule file by its in-container path; point it at the repo copy.
    config = yaml.safe_load((prom / "prometheus.yml").read_text())
    config["rule_files"] = [str(prom / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")], check=True,
                   capture_output=True)


def test_dashboard_covers_the_serving_signals():
    names = set().union(*used_names().values())
    for needed in ("sr3d_http_requests_total", "sr3d_queue_length", "sr3d_stage_duration_seconds_bucket",
                   "sr3d_time_to_first_token_seconds_bucket", "sr3d_inter_token_latency_seconds_bucket",
                   "sr3d_generation_tokens_total", "sr3d_engine_batch_size_bucket",
                   "sr3d_job_redeliveries_total", "sr3d_dlq_length"):
        assert needed in names, needed
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in DASHBOARD["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']} overlaps another"
        cells |= mine
        assert p["datasource"]["uid"] == "${datasource}"


def test_provisioning_matches_compose():
    grafana = COMPOSE["services"]["grafana"]
    mounts = dict(v.rsplit(":", 2)[:2] for v in grafana["volumes"])
    (provider,) = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/sr3d.yml").read_text())["providers"]
    dash_target = mounts["./deploy/grafana/sr3d-dashboard.json"]
    assert Path(dash_target).parent == Path(provider["options"]["path"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (ds,) = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert ds["url"] == "http://prometheus:9090" and "prometheus" in COMPOSE["services"]
    assert DASHBOARD["templating"]["list"][0]["current"]["value"] == ds["uid"]


def test_scrape_config_matches_compose_services():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"gateway:8000", "worker:9100"}
    assert COMPOSE["services"]["gateway"]["ports"] == ["8000:8000"]
    mounts = dict(v.rsplit(":", 2)[:2] for v in COMPOSE["services"]["prometheus"]["volumes"] if v.startswith("./"))
    assert set(config["rule_files"]) == {mounts["./deploy/prometheus/alerts.yml"]}
