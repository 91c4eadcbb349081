"""Offline helpers for the deploy checks: a small kustomize renderer, minimal CRD schemas, a
Prometheus text-exposition reader and a PromQL metric-name extractor.

The renderer implements exactly the kustomization features deploy/k8s uses and refuses any other,
so it can never silently render something different from `kustomize build`
(tests/test_deploy_k8s.py also compares it with `kubectl kustomize` where kubectl is installed).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

Obj = dict[str, Any]


class KustomizeError(ValueError):
    """A kustomization uses a feature this renderer does not implement, or is inconsistent."""


_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                   "CustomResourceDefinition", "PriorityClass", "IngressClass"}
# Strategic-merge keys of the pod-template lists we patch (from the Kubernetes API's patchMergeKey).
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
               "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}
# `ports` merges by containerPort only inside pod specs; keep strategic merge to workload kinds.
_SMP_KINDS = {"Deployment", "StatefulSet"}


def key_of(obj: Obj) -> tuple[str, str, str, str]:
    meta = obj["metadata"]
    return obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"]


def load_yaml_docs(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def render(directory: Path) -> list[Obj]:
    """`kustomize build directory` for the subset of kustomize deploy/k8s uses."""
    kfile = directory / "kustomization.yaml"
    spec = yaml.safe_load(kfile.read_text())
    unknown = set(spec) - _KUSTOMIZATION_FIELDS
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported kustomization fields {sorted(unknown)}")
    objs: list[Obj] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        objs.extend(render(path) if path.is_dir() else load_yaml_docs(path))
    _check_unique(objs, kfile)
    for patch in spec.get("patches", []):
        if set(patch) != {"path"}:
            raise KustomizeError(f"{kfile}: only `patches: - path: FILE` is supported, got {patch}")
        docs = load_yaml_docs(directory / patch["path"])
        if len(docs) != 1:
            raise KustomizeError(f"{patch['path']}: one patch document per file")
        objs = _apply_patch(objs, docs[0])
    if "namespace" in spec:
        for obj in objs:
            if obj["kind"] not in _CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        _set_image(objs, image)
    _check_unique(objs, kfile)
    return objs


def _check_unique(objs: list[Obj], where: Path) -> None:
    seen: set[tuple[str, str, str, str]] = set()
    for obj in objs:
        k = key_of(obj)
        if k in seen:
            raise KustomizeError(f"{where}: duplicate object {k}")
        seen.add(k)


def _apply_patch(objs: list[Obj], patch: Obj) -> list[Obj]:
    kind, meta = patch["kind"], patch["metadata"]
    hits = [i for i, o in enumerate(objs) if o["kind"] == kind and o["metadata"]["name"] == meta["name"]
            and ("namespace" not in meta or o["metadata"].get("namespace") == meta["namespace"])]
    if len(hits) != 1:
        raise KustomizeError(f"patch {kind}/{meta['name']} matches {len(hits)} objects")
    if patch.get("$patch") == "delete":
        return [o for i, o in enumerate(objs) if i != hits[0]]
    if kind not in _SMP_KINDS:
        raise KustomizeError(f"strategic merge is implemented for {sorted(_SMP_KINDS)} only, not {kind}")
    out = list(objs)
    out[hits[0]] = _merge_map(objs[hits[0]], patch)
    return out


def _merge_map(base: Obj, patch: Obj) -> Obj:
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if k.startswith("$"):
            raise KustomizeError(f"unsupported directive {k}")
        if v is None:  # strategic merge: null deletes the field
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge_map(out[k], v)
        elif isinstance(v, list) and k in _MERGE_KEYS and isinstance(out.get(k), list):
            out[k] = _merge_list(out[k], v, _MERGE_KEYS[k])
        else:  # scalars and lists without a merge key are replaced
            out[k] = _strip_deletes(copy.deepcopy(v))
    return out


def _merge_list(base: list[Obj], patch: list[Obj], key: str) -> list[Obj]:
    out = copy.deepcopy(base)
    for item in patch:
        at = next((i for i, x in enumerate(out) if x.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if at is not None:
                out.pop(at)
        elif at is None:
            out.append(_strip_deletes(copy.deepcopy(item)))
        else:
            out[at] = _merge_map(out[at], item)
    return out


def _strip_deletes(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_deletes(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_deletes(v) for v in value if not (isinstance(v, dict) and v.get("$patch") == "delete")]
    return value


_IMAGE = re.compile(r"^(?P<name>[^@]+?)(?::(?P<tag>[\w][\w.-]*))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")


def split_image(ref: str) -> tuple[str, str | None, str | None]:
    m = _IMAGE.match(ref)
    if not m:
        raise KustomizeError(f"not an image reference: {ref}")
    return m["name"], m["tag"], m["digest"]


def _set_image(objs: list[Obj], rule: dict[str, str]) -> None:
    if set(rule) - {"name", "newName", "newTag", "digest"}:
        raise KustomizeError(f"unsupported images entry {rule}")
    for container in iter_containers(objs):
        name, tag, digest = split_image(container["image"])
        if name != rule["name"]:
            continue
        name = rule.get("newName", name)
        if "digest" in rule:
            container["image"] = f"{name}@{rule['digest']}"
        elif "newTag" in rule:
            container["image"] = f"{name}:{rule['newTag']}"
        else:
            container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def pod_spec(obj: Obj) -> Obj | None:
    if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        return obj["spec"]["template"]["spec"]
    return None


def iter_containers(objs: list[Obj]):
    for obj in objs:
        spec = pod_spec(obj)
        if spec:
            yield from spec.get("initContainers", [])
            yield from spec.get("containers", [])


def is_pinned(ref: str) -> bool:
    """Pinned = a digest, or a tag naming a full version (x.y.z), never a moving tag like `7` or `latest`."""
    _, tag, digest = split_image(ref)
    return digest is not None or (tag is not None and re.search(r"\d+\.\d+\.\d+", tag) is not None)


# -------------------------------------------------------------------------------- CRD schemas
# Minimal JSON schemas for the custom resources we ship, covering exactly the fields we use
# (additionalProperties: false, so a typo is an error). Upstream CRDs are not vendored offline.
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
    "namespace": {"type": "string"}, "labels": _STR_MAP, "annotations": _STR_MAP}, "additionalProperties": False}
_DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"}
_MATCH_LABELS = {"type": "object", "required": ["matchLabels"], "additionalProperties": False,
                 "properties": {"matchLabels": _STR_MAP}}


def _crd(api_version: str, kind: str, spec: Obj) -> Obj:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
            "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind},
                           "metadata": _META, "spec": spec}}


CRD_SCHEMAS: dict[tuple[str, str], Obj] = {
    ("keda.sh/v1alpha1", "ScaledObject"): _crd("keda.sh/v1alpha1", "ScaledObject", {
        "type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False, "properties": {
            "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                               "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                              "apiVersion": {"type": "string"}}},
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "pollingInterval": {"type": "integer", "minimum": 1},
            "cooldownPeriod": {"type": "integer", "minimum": 0},
            "advanced": {"type": "object", "additionalProperties": False, "properties": {
                "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                  "properties": {"behavior": {"type": "object"}}}}},
            "triggers": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["type", "metadata"], "additionalProperties": False, "properties": {
                    "type": {"const": "redis-streams"},
                    # KEDA trigger metadata is map[string]string: a YAML number here fails at apply time.
                    "metadata": {"type": "object", "required": ["stream", "consumerGroup", "lagCount"],
                                 "additionalProperties": False, "properties": {
                                     "address": {"type": "string", "pattern": r"^[a-z0-9.-]+:[0-9]+$"},
                                     "stream": {"type": "string"}, "consumerGroup": {"type": "string"},
                                     "lagCount": {"type": "string", "pattern": r"^[1-9][0-9]*$"},
                                     "activationLagCount": {"type": "string", "pattern": r"^[0-9]+$"}}}}}}}}),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _crd("monitoring.coreos.com/v1", "ServiceMonitor", {
        "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False, "properties": {
            "selector": _MATCH_LABELS,
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["port", "path"], "additionalProperties": False, "properties": {
                    "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                    "interval": _DURATION,
                    # the operator's SafeAuthorization: a scheme and a key of a Secret in the same namespace
                    "authorization": {"type": "object", "required": ["credentials"], "additionalProperties": False,
                                      "properties": {"type": {"type": "string"}, "credentials": {
                                          "type": "object", "required": ["name", "key"], "additionalProperties": False,
                                          "properties": {"name": {"type": "string"}, "key": {"type": "string"},
                                                         "optional": {"type": "boolean"}}}}}}}}}}),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _crd("monitoring.coreos.com/v1", "PrometheusRule", {
        "type": "object", "required": ["groups"], "additionalProperties": False, "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "rules"], "additionalProperties": False, "properties": {
                    "name": {"type": "string"},
                    "rules": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["alert", "expr"], "additionalProperties": False,
                        "properties": {"alert": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
                                       "expr": {"type": "string", "minLength": 1}, "for": _DURATION,
                                       "labels": _STR_MAP, "annotations": _STR_MAP}}}}}}}}),
}


# -------------------------------------------------------------------------------- Prometheus
_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("", "_sum", "_count", "_created"), "untyped": ("",), "info": ("_info",),
             "stateset": ("",), "gaugehistogram": ("_bucket", "_gsum", "_gcount")}


def exposed_series_names(text: str) -> set[str]:
    """Every series name a scrape of `text` (Prometheus text format 0.0.4) can produce.

    Names come from `# TYPE` lines (a labelled metric that was never observed has no sample line,
    but is still part of the contract) expanded by type suffix, plus every sample line's name."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            base = name.removesuffix("_total") if kind == "counter" else name
            names.update(base + s for s in _SUFFIXES[kind.strip()])
        elif line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                 "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (also checks brackets balance).

    A lexer, not a parser: strings, label matchers, ranges and grouping label lists are removed;
    what is left that is neither a function call, an operator keyword nor an aggregation is a metric."""
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            raise ValueError(f"unbalanced {ch!r} in {expr!r}")
    if stack:
        raise ValueError(f"unclosed {stack[-1]!r} in {expr!r}")
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS or word in _AGGREGATIONS:
            continue
        names.add(word)
    return names
