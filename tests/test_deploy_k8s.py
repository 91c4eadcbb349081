"""deploy/k8s: render every kustomization offline and check it as the cluster would."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

try:
    from deploy_support import (CRD_SCHEMAS, K8S, KustomizeError, is_pinned, iter_containers, key_of, pod_spec,
                                render)
except ImportError:  # tests/ turned into a package
    from tests.deploy_support import (CRD_SCHEMAS, K8S, KustomizeError, is_pinned, iter_containers, key_of,
                                      pod_spec, render)

TARGETS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu", "cpu-demo": K8S / "overlays" / "cpu-demo"}
# Oldest and newest Kubernetes minor versions the manifests must be valid for.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Secrets each target expects to exist already (created out of band; see deploy/README.md).
EXTERNAL_SECRETS = {"base": {"sr3d-api-keys", "sr3d-tls"}, "gpu": {"sr3d-api-keys", "sr3d-tls"},
                    "cpu-demo": {"sr3d-tls"}}
SERVED = {"gateway": (8000, {"/healthz", "/readyz"}), "worker": (9100, {"/healthz", "/readyz"})}


@pytest.fixture(scope="module", params=sorted(TARGETS))
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(TARGETS[request.param])


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def one(objs, kind, name):
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} found"
    return hits[0]


def workloads(objs):
    return [o for o in objs if pod_spec(o) is not None]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with built-in kustomize) is not installed")
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_renderer_matches_kubectl_kustomize(target):
    out = subprocess.run(["kubectl", "kustomize", str(TARGETS[target])], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    theirs = {key_of(o): o for o in yaml.safe_load_all(out) if o}
    ours = {key_of(o): o for o in render(TARGETS[target])}
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert ours[k] == theirs[k], k


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\ncommonLabels: {a: b}\n")
    with pytest.raises(KustomizeError, match="commonLabels"):
        render(tmp_path)
    (tmp_path / "p.yaml").write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: missing}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\npatches: [{path: p.yaml}]\n")
    with pytest.raises(KustomizeError, match="matches 0 objects"):
        render(tmp_path)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_its_schema(rendered, version):
    _, objs = rendered
    for obj in objs:
        crd = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if crd is not None:
            jsonschema.validate(obj, crd)
        else:
            kubernetes_validate.validate(obj, version, strict=True)


def test_names_are_unique_and_namespaced(rendered):
    _, objs = rendered
    assert len({key_of(o) for o in objs}) == len(objs)
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "sr3d", key_of(o)


def test_selectors_point_at_existing_pods(rendered):
    _, objs = rendered
    pods = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"] for o in workloads(objs)}
    for w in workloads(objs):
        assert selects(w["spec"]["selector"]["matchLabels"], pods[w["metadata"]["name"]])
    for svc in by_kind(objs, "Service"):
        hits = [n for n, labels in pods.items() if selects(svc["spec"]["selector"], labels)]
        assert len(hits) == 1, (svc["metadata"]["name"], hits)
        ports = {p["name"]: p["containerPort"] for w in workloads(objs) if w["metadata"]["name"] == hits[0]
                 for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, (svc["metadata"]["name"], p)
    for pdb in by_kind(objs, "PodDisruptionBudget"):
        assert [n for n, labels in pods.items() if selects(pdb["spec"]["selector"]["matchLabels"], labels)]
    for np in by_kind(objs, "NetworkPolicy"):
        sel = np["spec"]["podSelector"].get("matchLabels", {})
        assert [n for n, labels in pods.items() if selects(sel, labels)], np["metadata"]["name"]
    services = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}
    for sm in by_kind(objs, "ServiceMonitor"):
        hits = [s for s in services.values() if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert len(hits) == 1
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in hits[0]["spec"]["ports"]}
    for ing in by_kind(objs, "Ingress"):
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["port"]["name"] in {p["name"] for p in services[backend["name"]]["spec"]["ports"]}
    deployments = {d["metadata"]["name"] for d in by_kind(objs, "Deployment")}
    for hpa in by_kind(objs, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    for so in by_kind(objs, "ScaledObject"):
        assert so["spec"]["scaleTargetRef"]["name"] in deployments
        assert so["spec"]["scaleTargetRef"]["name"] not in {h["spec"]["scaleTargetRef"]["name"]
                                                            for h in by_kind(objs, "HorizontalPodAutoscaler")}
    for sts in by_kind(objs, "StatefulSet"):
        assert sts["spec"]["serviceName"] in services


def test_probes_hit_the_ports_and_paths_the_service_serves(rendered):
    _, objs = rendered
    for w in by_kind(objs, "Deployment"):
        component = w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        port, paths = SERVED[component]
        for c in pod_spec(w)["containers"]:
            named = {p["name"]: p["containerPort"] for p in c["ports"]}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                get = c[probe]["httpGet"]
                assert named.get(get["port"], get["port"]) == port, (component, probe)
                assert get["path"] in paths, (component, probe)
            # Readiness = model loaded / Redis reachable; liveness stays the cheap check.
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_pods_run_non_root_with_resources(rendered):
    _, objs = rendered
    for w in workloads(objs):
        spec = pod_spec(w)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] > 0
        assert spec.get("automountServiceAccountToken") is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
            assert "memory" in c["resources"]["limits"], c["name"]


def test_references_resolve(rendered):
    target, objs = rendered
    have = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for w in workloads(objs):
        spec = pod_spec(w)
        for c in spec["containers"]:
            for src in c.get("envFrom", []):
                assert ("ConfigMap", src["configMapRef"]["name"]) in have
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ("Secret", ref["name"]) in have or ref["name"] in EXTERNAL_SECRETS[target]
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])} | {
                t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for vol in spec.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert ("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]) in have
    for ing in by_kind(objs, "Ingress"):
        for tls in ing["spec"].get("tls", []):
            assert ("Secret", tls["secretName"]) in have or tls["secretName"] in EXTERNAL_SECRETS[target]


def test_images_are_pinned(rendered):
    _, objs = rendered
    for c in iter_containers(objs):
        assert is_pinned(c["image"]), c["image"]


def test_gpu_worker_shape(rendered):
    target, objs = rendered
    worker = one(objs, "Deployment", "sr3d-worker")
    spec = pod_spec(worker)
    (c,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    env = {e["name"]: e.get("value") for e in c["env"]}
    # The drain (finish in-flight jobs) must fit in the grace period; leftovers are reclaimed anyway.
    assert spec["terminationGracePeriodSeconds"] >= 120
    assert c["lifecycle"]["preStop"]["exec"]["command"]
    if target == "cpu-demo":
        assert "nvidia.com/gpu" not in str(worker)
        assert env["SR3D_ENGINE"] == "torch" and env["SR3D_DEVICE"] == "cpu" and "SR3D_MODEL" not in env
        assert worker["spec"]["replicas"] == 1
        assert not by_kind(objs, "ScaledObject")
        assert c["image"].startswith("sr3d-worker-cpu:")
    else:
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert env["SR3D_ENGINE"] == "vllm"
        assert volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"] == "sr3d-models"
        assert env["SR3D_MODEL"].startswith("/models/")
        assert "replicas" not in worker["spec"]  # KEDA owns it
        assert spec["terminationGracePeriodSeconds"] >= 600
        (so,) = by_kind(objs, "ScaledObject")
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        assert (trigger["type"], meta["stream"], meta["consumerGroup"]) == ("redis-streams", "sr3d:jobs", "sr3d-workers")
        redis = one(objs, "Service", "sr3d-redis")
        assert meta["address"] == f"sr3d-redis.{redis['metadata']['namespace']}.svc.cluster.local:6379"
        assert so["spec"]["minReplicaCount"] >= 1


def test_redis_is_persistent_with_aof(rendered):
    _, objs = rendered
    redis = one(objs, "StatefulSet", "sr3d-redis")
    (c,) = pod_spec(redis)["containers"]
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/data"}
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    cm = one(objs, "ConfigMap", "sr3d-settings")
    assert cm["data"]["REDIS_URL"].startswith("redis://sr3d-redis:6379")


def test_ingress_is_set_up_for_sse_and_uploads(rendered):
    _, objs = rendered
    (ing,) = by_kind(objs, "Ingress")
    ann = ing["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(ann["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    body = ann["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert body.endswith("m")
    upload_mb = int(one(objs, "ConfigMap", "sr3d-settings")["data"]["SR3D_MAX_UPLOAD_MB"])
    assert int(body[:-1]) > upload_mb  # multipart overhead on top of the file cap
    assert {p["backend"]["service"]["name"]
            for r in ing["spec"]["rules"] for p in r["http"]["paths"]} == {"sr3d-gateway"}


# ------------------------------------------------------------------ NetworkPolicy semantics
def _peer_matches(peer, policy_ns, src_ns, src_labels):
    ns_ok = (selects(peer["namespaceSelector"].get("matchLabels", {}), {"kubernetes.io/metadata.name": src_ns})
             if "namespaceSelector" in peer else src_ns == policy_ns)
    pod_ok = selects(peer["podSelector"].get("matchLabels", {}), src_labels) if "podSelector" in peer else True
    return ns_ok and pod_ok


def _allowed(policies, direction, pod_ns, pod_labels, peer_ns, peer_labels, port):
    """Kubernetes semantics: isolated iff a policy of that direction selects the pod; then any rule allows."""
    kind, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selecting = [p for p in policies if p["metadata"]["namespace"] == pod_ns and direction in p["spec"]["policyTypes"]
                 and selects(p["spec"]["podSelector"].get("matchLabels", {}), pod_labels)]
    if not selecting:
        return True
    for p in selecting:
        for rule in p["spec"].get(kind, []):
            peer_ok = not rule.get(peers) or any(
                _peer_matches(x, p["metadata"]["namespace"], peer_ns, peer_labels) for x in rule[peers])
            port_ok = not rule.get("ports") or any(r["port"] == port for r in rule["ports"])
            if peer_ok and port_ok:
                return True
    return False


def test_network_policies_allow_only_the_intended_paths(rendered):
    _, objs = rendered
    policies = by_kind(objs, "NetworkPolicy")
    ns = "sr3d"
    pods = {c: one(objs, k, f"sr3d-{c}")["spec"]["template"]["metadata"]["labels"]
            for c, k in (("gateway", "Deployment"), ("worker", "Deployment"), ("redis", "StatefulSet"))}

    def can(src, dst, port, src_ns=ns):
        src_labels = pods.get(src, {"app": src})
        egress = src_ns != ns or _allowed(policies, "Egress", ns, src_labels, ns, pods[dst], port)
        return egress and _allowed(policies, "Ingress", ns, pods[dst], src_ns, src_labels, port)

    assert can("controller", "gateway", 8000, src_ns="ingress-nginx")
    assert not can("controller", "worker", 9100, src_ns="ingress-nginx")
    assert not can("controller", "redis", 6379, src_ns="ingress-nginx")
    assert not can("someone", "gateway", 8000, src_ns="default")
    assert can("gateway", "redis", 6379) and can("worker", "redis", 6379)
    assert not can("worker", "gateway", 8000)
    assert not can("gateway", "worker", 9100)
    assert can("prometheus", "worker", 9100, src_ns="monitoring")
    assert can("prometheus", "gateway", 8000, src_ns="monitoring")
    # Workers reach Redis and DNS only: e.g. nothing on the internet.
    worker_egress = [r for p in policies if selects(p["spec"]["podSelector"].get("matchLabels", {}), pods["worker"])
                     for r in p["spec"].get("egress", [])]
    assert worker_egress and all(r.get("to") for r in worker_egress)
    assert sorted({port["port"] for r in worker_egress for port in r["ports"]}) == [53, 6379]


# ------------------------------------------------------------------ against the real service code
def _parse_cli(argv: list[str]):
    import argparse
    import importlib

    from service.cli import COMMANDS

    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[argv[0]]).add(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_container_args_parse_and_drain_fits_the_grace_period(rendered):
    _, objs = rendered
    for w in by_kind(objs, "Deployment"):
        spec = pod_spec(w)
        (c,) = spec["containers"]
        args = _parse_cli(c["args"])
        if args.command == "worker":
            # SIGTERM -> finish in-flight jobs for at most drain_timeout, then exit before SIGKILL.
            assert args.drain_timeout + 30 <= spec["terminationGracePeriodSeconds"]
            assert (args.metrics_port or 9100) == 9100 and args.metrics_host == "0.0.0.0"
        else:
            assert (args.command, args.host, args.port) == ("gateway", "0.0.0.0", 8000)


def test_settings_load_from_the_rendered_environment(rendered, monkeypatch):
    """Every SR3D_* variable we set is a real setting, and its value passes the service's validation."""
    from service.settings import Settings

    _, objs = rendered
    cm = one(objs, "ConfigMap", "sr3d-settings")["data"]
    fields = {f"SR3D_{name.upper()}" for name in Settings.model_fields} | {"REDIS_URL"}
    for w in by_kind(objs, "Deployment"):
        (c,) = pod_spec(w)["containers"]
        env = {**cm, **{e["name"]: e.get("value", "from-secret") for e in c.get("env", [])}}
        assert {k for k in env if k.startswith("SR3D_") or k == "REDIS_URL"} <= fields
        with monkeypatch.context() as m:
            for k in [k for k in __import__("os").environ if k.startswith("SR3D_") or k == "REDIS_URL"]:
                m.delenv(k)
            for k, v in env.items():
                m.setenv(k, v)
            settings = Settings()
        assert settings.redis_url == cm["REDIS_URL"]


def test_prometheus_scrapes_the_gateway_with_a_key_it_accepts(rendered):
    """With API keys on, the gateway's /metrics needs a key (SR3D_METRICS_PUBLIC off): the gateway's
    ServiceMonitor sends a bearer token from the same Secret, and where a Secret is rendered (the demo)
    that token is one of the gateway's keys."""
    _, objs = rendered
    (sm,) = [s for s in by_kind(objs, "ServiceMonitor") if s["metadata"]["name"] == "sr3d-gateway"]
    (endpoint,) = sm["spec"]["endpoints"]
    cred = endpoint["authorization"]["credentials"]
    assert endpoint["authorization"]["type"] == "Bearer" and cred["name"] == "sr3d-api-keys"
    for secret in (s for s in by_kind(objs, "Secret") if s["metadata"]["name"] == "sr3d-api-keys"):
        data = secret["stringData"]
        assert data[cred["key"]] in data["SR3D_API_KEYS"].split(",")
