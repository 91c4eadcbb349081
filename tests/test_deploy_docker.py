"""Dockerfile + docker-compose.yml: parsed and cross-checked offline (no Docker daemon in CI)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pytest
import yaml

try:
    from deploy_support import ROOT, is_pinned
except ImportError:  # tests/ turned into a package
    from tests.deploy_support import ROOT, is_pinned

from service.cli import COMMANDS


@dataclass
class Stage:
    name: str
    base: str  # an image reference or the name of an earlier stage
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages of a Dockerfile (continuation lines joined)."""
    logical = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for raw in logical.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), re.IGNORECASE)
            assert m, f"every stage is named: {line}"
            base = re.sub(r"\$\{(\w+)\}", lambda g: args[g.group(1)], m.group(1))
            current = stages[m.group(2)] = Stage(m.group(2), base)
        elif op == "ARG" and current is None:
            name, _, default = rest.partition("=")
            args[name] = default
        elif current is not None:
            current.instructions.append((op, rest.strip()))
    return args, stages


DOCKERFILE = (ROOT / "Dockerfile").read_text()
ARGS, STAGES = parse_dockerfile(DOCKERFILE)
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
TARGETS = {"gateway": 8000, "cpu-demo": 9100, "gpu": 9100}


def chain(stage: str) -> list[Stage]:
    """The stage and its ancestors, nearest first."""
    out = [STAGES[stage]]
    while out[-1].base in STAGES:
        out.append(STAGES[out[-1].base])
    return out


def effective(stage: str, op: str) -> str | None:
    """The value of the last `op` instruction a target inherits (CMD/ENTRYPOINT/USER/HEALTHCHECK)."""
    for s in chain(stage):
        for got, rest in reversed(s.instructions):
            if got == op:
                return rest
    return None


def env_of(stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for s in reversed(chain(stage)):
        for op, rest in s.instructions:
            if op == "ENV":
                env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


def test_base_images_are_pinned():
    for s in STAGES.values():
        if s.base not in STAGES:
            assert is_pinned(s.base), s.base
    assert chain("gpu")[-1].base.startswith("nvidia/cuda:13.")
    assert "ubuntu24.04" in chain("gpu")[-1].base  # Python 3.12 from the distribution
    assert chain("gateway")[-1].base.startswith("python:3.12.")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_targets_run_sr3d_as_non_root_with_a_healthcheck(target):
    assert json.loads(effective(target, "ENTRYPOINT")) == ["sr3d"]
    cmd = json.loads(effective(target, "CMD"))
    assert cmd[0] in COMMANDS  # a real `sr3d` subcommand
    user = effective(target, "USER")
    assert user and user.split(":")[0] not in {"0", "root"}
    health = effective(target, "HEALTHCHECK")
    assert health and "SR3D_HEALTH_URL" in health
    assert env_of(target)["SR3D_HEALTH_URL"] == f"http://127.0.0.1:{TARGETS[target]}/healthz"


def test_gateway_command_parses_with_the_real_cli():
    import argparse

    cmd = json.loads(effective("gateway", "CMD"))
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[cmd[0]]).add(parser.add_subparsers(dest="command"))
    args = parser.parse_args(cmd)
    assert (args.host, args.port) == ("0.0.0.0", 8000)


def test_gpu_image_installs_vllm_on_cuda_13_and_no_weights():
    installs = [rest for s in chain("gpu-build") for op, rest in s.instructions if op == "RUN" and "pip install" in rest]
    assert any('".[vllm]"' in r and "whl/cu130" in r for r in installs)
    env = env_of("gpu")
    assert (env["SR3D_ENGINE"], env["SR3D_MODEL"]) == ("vllm", "/models/sr3d")
    for s in STAGES.values():
        for op, rest in s.instructions:
            if op == "COPY" and "--from" not in rest:
                sources = rest.split()[:-1]
                assert all(src.split("/")[0] in {"pyproject.toml", "README.md", "model", "service"}
                           for src in sources), rest
    assert "SR3D_MODEL" not in env_of("cpu-demo")  # tiny demo checkpoint


def test_dockerignore_keeps_weights_and_local_state_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "var/", "**/*.safetensors", "bench-out/"} <= ignored


# ------------------------------------------------------------------ docker-compose.yml
def test_compose_builds_only_existing_targets_and_pins_images():
    for name, svc in COMPOSE["services"].items():
        if "build" in svc:
            assert svc["build"]["target"] in STAGES, name
        else:
            assert is_pinned(svc["image"]), (name, svc["image"])


def test_compose_redis_uses_aof_and_services_use_it():
    redis = COMPOSE["services"]["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    for name in ("gateway", "worker", "worker-cpu"):
        svc = COMPOSE["services"][name]
        assert svc["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_workers_profiles_and_gpu_reservation():
    worker, cpu = COMPOSE["services"]["worker"], COMPOSE["services"]["worker-cpu"]
    assert worker["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    (dev,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
    assert worker["build"]["target"] == "gpu" and cpu["build"]["target"] == "cpu-demo"
    assert cpu["environment"]["SR3D_ENGINE"] == "torch" and "SR3D_MODEL" not in cpu["environment"]
    # Prometheus scrapes `worker:9100` whichever profile runs.
    assert "worker" in cpu["networks"]["default"]["aliases"]


def test_compose_bind_mounts_exist():
    for name, svc in COMPOSE["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), (name, src)
            elif not src.startswith("$"):
                assert src in COMPOSE["volumes"], (name, src)


def test_compose_worker_drain_fits_stop_grace_period():
    import argparse
    import importlib

    for name in ("worker", "worker-cpu"):
        svc = COMPOSE["services"][name]
        parser = argparse.ArgumentParser()
        importlib.import_module(COMMANDS["worker"]).add(parser.add_subparsers(dest="command"))
        args = parser.parse_args(svc["command"])
        m = re.fullmatch(r"(\d+)([sm])", svc["stop_grace_period"])
        grace = int(m.group(1)) * (60 if m.group(2) == "m" else 1)
        assert args.drain_timeout + 20 <= grace, name
