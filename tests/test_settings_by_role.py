"""Settings by role (service/settings.py): each process validates only its own variables.

* A gateway whose environment holds variables a worker would refuse starts and serves, and a worker
  with variables a gateway would refuse claims and answers the job: real processes, real Redis, the
  tiny demo checkpoint.
* A process's own refused variable ends it before anything starts: exit code 2 and one stderr line
  naming the variable, no traceback (`sr3d gateway`, `sr3d worker`, `sr3d serve`).
* Nothing in service/ or model/ reads the environment except through service/settings.py.
"""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.client import SR3DClient
from service.local_stack import Stack
from service.settings import (
    ClientSettings,
    GatewaySettings,
    Settings,
    SettingsError,
    StoreSettings,
    WorkerSettings,
    load,
)
from service.worker_startup import EXIT_CONFIG
from tests.faultkit import FAULT_ENV, mixed_requests, verdict

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
# Values the other role refuses (each one fails its own role's validation; checked below).
BAD_FOR_WORKER = {"SR3D_DEPTH_BATCH_JOBS": "0", "SR3D_VLLM_MAX_NUM_SEQS": "many", "SR3D_DEVICE": "tpu",
                  "SR3D_ENGINE": "tensorflow", "SR3D_WORKER_METRICS_PORT": "99999"}
BAD_FOR_GATEWAY = {"SR3D_PORT": "eighty", "SR3D_QUOTA_JOBS": "0", "SR3D_MAX_REGIONS": "many",
                   "SR3D_RATE_LIMIT_PER_MIN": "-1", "SR3D_REMOTE_MEDIA_TIMEOUT_S": "1000"}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("SR3D_") or name in ("REDIS_URL", "CUDA_VISIBLE_DEVICES"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize(("own", "other", "role"), [(BAD_FOR_GATEWAY, BAD_FOR_WORKER, GatewaySettings),
                                                    (BAD_FOR_WORKER, BAD_FOR_GATEWAY, WorkerSettings)])
def test_a_role_reads_its_own_variables_and_ignores_the_others(clean_env: pytest.MonkeyPatch, own: dict[str, str],
                                                               other: dict[str, str], role: type) -> None:
    with clean_env.context() as env:
        for name, value in other.items():
            env.setenv(name, value)
        load(role)  # the other role's refused values are not read
    for name, value in own.items():
        with clean_env.context() as env:
            env.setenv(name, value)
            with pytest.raises(SettingsError, match=f"^{re.escape(f'{name}={value!r}: ')}"):
                load(role)
            with pytest.raises(SettingsError, match=f"^{re.escape(name)}="):
                load(Settings)  # `sr3d serve` runs both roles: it refuses either


def test_role_settings_keep_their_derived_values_and_list_parsing(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SR3D_API_KEYS", "a, b,,c")
    clean_env.setenv("SR3D_MAX_UPLOAD_MB", "2")
    clean_env.setenv("SR3D_DATA_DIR", "relative/data")
    gw = load(GatewaySettings)
    assert (gw.api_keys, gw.max_upload_bytes, gw.quota_stored_bytes, gw.chat_body_max_bytes) == (["a", "b", "c"], 2 << 20, 256 << 20, 16 << 20)
    w = load(WorkerSettings)
    assert (w.max_upload_bytes, w.resolved_blob_dir, w.vllm.max_num_seqs) == (2 << 20, Path("relative/data/blobs"), 64)
    assert not hasattr(w, "api_keys") and not hasattr(gw, "depth_batch_jobs") and not hasattr(gw, "vllm")
    assert set(Settings.model_fields) == set(GatewaySettings.model_fields) | set(WorkerSettings.model_fields)
    assert set(StoreSettings.model_fields) == set(GatewaySettings.model_fields) & set(WorkerSettings.model_fields)
    clean_env.setenv("REDIS_URL", "redis://example:6379/0")
    assert load(StoreSettings).redis_url == "redis://example:6379/0"  # the alias, as before
    clean_env.setenv("SR3D_URL", "http://gpu-box:8000")
    assert load(ClientSettings).url == "http://gpu-box:8000"


def run_cli(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SR3D_") and k != "REDIS_URL"}
    argv = [sys.executable, "-m", "service.cli", command] + (["--port", "0"] if command != "worker" else [])
    return subprocess.run(argv, env={**base, **env}, capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize(("command", "name", "value"), [
    ("gateway", "SR3D_QUOTA_JOBS", "0"),
    ("gateway", "SR3D_MAX_UPLOAD_MB", "lots"),  # a job-store variable: both roles read it
    ("worker", "SR3D_DEPTH_BATCH_JOBS", "0"),
    ("worker", "SR3D_VLLM_MAX_NUM_SEQS", "many"),  # nested SR3D_VLLM_* named as such
    ("worker", "SR3D_MAX_FRAMES", "0"),
    ("serve", "SR3D_PORT", "eighty"),
    ("serve", "SR3D_DEVICE", "tpu"),
])
def test_a_refused_variable_of_its_own_ends_the_process_with_one_line_naming_it(tmp_path: Path, command: str,
                                                                                name: str, value: str) -> None:
    done = run_cli(command, {"SR3D_DATA_DIR": str(tmp_path / "data"), "REDIS_URL": "redis://127.0.0.1:1/0", name: value})
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == EXIT_CONFIG, (done.returncode, output)
    assert output.splitlines() == [done.stderr.strip()], output  # one line, on stderr, no traceback
    assert output.startswith(f"sr3d {command}: {name}={value!r}: "), output
    assert not (tmp_path / "data").exists()  # ended before it touched anything


def test_gateway_and_worker_each_ignore_the_other_roles_refused_variables(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    with Stack(tmp_path / "gateway", {**FAULT_ENV, "SR3D_DATA_DIR": data, **BAD_FOR_WORKER}) as front:
        front.start_redis()
        gw, url = front.start_gateway()
        with Stack(tmp_path / "worker", {**FAULT_ENV, "SR3D_DATA_DIR": data, **BAD_FOR_GATEWAY},
                   redis_port=front.redis_port) as back:
            worker, metrics = back.start_worker()
            front.wait_ready(url, gw)
            back.wait_ready(metrics, worker)

            async def one_job() -> list:
                async with SR3DClient(url) as client:
                    return [await client.run(req) for req in mixed_requests(2, max_tokens=4)]

            results = asyncio.run(one_job())
            assert verdict(results) == [], [worker.log_tail(2000), gw.log_tail(2000)]
        assert back.leaked == []
    assert front.leaked == []


# Files of service/ and model/ that may touch os.environ, and why. Reading a variable is not one of them.
ENV_ALLOWED = {
    "service/settings.py": "the one reader (through pydantic-settings)",
    "service/local_stack.py": "passes its own environment on to the processes it starts, as a shell would",
}
ENV_TOUCH = re.compile(r"\benviron\b|\bgetenv\b|\bputenv\b")


def test_nothing_else_reads_the_environment() -> None:
    found = {}
    for folder in ("service", "model"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            lines = [f"{n}: {line.strip()}" for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                     if ENV_TOUCH.search(line)]
            if lines and rel not in ENV_ALLOWED:
                found[rel] = lines
    assert found == {}, f"read the environment outside service/settings.py (add the variable to a role there): {found}"
    # the pattern sees what it is meant to see
    assert ENV_TOUCH.search('os.environ.get("SR3D_URL")') and ENV_TOUCH.search("from os import getenv")
    assert "environ" in (ROOT / "service/local_stack.py").read_text(encoding="utf-8")  # the allowance is still needed
