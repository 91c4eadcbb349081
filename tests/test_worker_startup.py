"""`sr3d worker` start-up on a host with several workers (issue 31), every part a real OS process on
real Redis with the tiny demo checkpoint.

* A metrics port that is taken ends the worker before it loads any model: exit code 4, one stderr line
  naming the address and the settings to change; the data dir where the demo model would be built
  stays untouched. A missing SR3D_MODEL directory (exit 2) and a Redis that does not answer (exit 5)
  end it the same way.
* SR3D_WORKER_METRICS_PORT=0: any free port, found in the worker's Redis registration and served.
* Two workers on one host with default settings, one per GPU (CUDA_VISIBLE_DEVICES, as the README's
  multi-GPU layout runs them): each serves on 9100 + its GPU index, both serve jobs, and SIGKILLing
  either leaves the other finishing every job exactly once.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync

from service import keys
from service.client import JobResult, SR3DClient, SSEEvent
from service.consumer_name import consumer_is
from service.local_stack import LOOPBACK, Proc, Stack, queue_state
from service.worker_startup import BASE_METRICS_PORT, EXIT_METRICS_PORT
from tests.faultkit import FAULT_ENV, mixed_requests, verdict, wait_until

pytestmark = pytest.mark.timeout(420)

# An operator's "default settings": nothing in the test runner's own environment may pick the port.
assert "SR3D_WORKER_METRICS_PORT" not in os.environ, "unset SR3D_WORKER_METRICS_PORT to run these tests"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    # one data dir for the module: the tiny checkpoint is built once (flock-protected). The per-key
    # quotas (issue 30: 4 uploads at once, 16 jobs) are the gateway's business, not these tests': the
    # 10 jobs are submitted at once from one client.
    return {**FAULT_ENV, "SR3D_DATA_DIR": str(tmp_path_factory.getbasetemp() / "sr3d-startup-data"),
            "SR3D_QUOTA_UPLOADS": "64", "SR3D_QUOTA_JOBS": "64"}


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_gpu_indexes(n: int) -> list[int]:
    """n GPU indexes whose derived ports (9100 + index) nothing on this machine listens on now."""
    found = [i for i in range(64) if port_free(BASE_METRICS_PORT + i)][:n]
    if len(found) < n:
        pytest.skip(f"ports {BASE_METRICS_PORT}..{BASE_METRICS_PORT + 63} are taken on this machine; the default-port rule needs {n} of them")
    return found


def registrations(redis_url: str) -> dict[str, dict[str, str]]:
    """Live worker registrations, by consumer name (service.worker_registry)."""
    r = redis_sync.Redis.from_url(redis_url, decode_responses=True)
    try:
        out = {}
        for key in r.scan_iter(match=keys.worker_key("*")):
            fields = r.hgetall(key)
            if fields:
                out[fields["consumer"]] = fields
        return out
    finally:
        r.close()


def registration_of(redis_url: str, proc: Proc) -> dict[str, str] | None:
    return next((f for c, f in registrations(redis_url).items() if consumer_is(c, proc.pid)), None)


def wait_exit(proc: Proc, timeout: float) -> tuple[int | None, float]:
    t0 = time.monotonic()
    rc = proc.wait(timeout)
    return rc, time.monotonic() - t0


# ---------------------------------------------------------------- a taken port ends the worker at once
@pytest.mark.parametrize("how", ["default_port_of_its_gpu", "set_port"])
def test_taken_metrics_port_ends_the_worker_before_the_model_loads(tmp_path: Path, how: str) -> None:
    data = tmp_path / "data"  # the demo checkpoint and depth models would be built here on model load
    with Stack(tmp_path, {**FAULT_ENV, "SR3D_DATA_DIR": str(data)}) as st, socket.socket() as holder:
        st.start_redis()
        if how == "default_port_of_its_gpu":
            (index,) = free_gpu_indexes(1)
            port, worker_env = BASE_METRICS_PORT + index, {"CUDA_VISIBLE_DEVICES": str(index)}
        else:
            port, worker_env = 0, {}
        holder.bind((LOOPBACK, port))  # another worker (or anything) already listens there
        holder.listen()
        port = holder.getsockname()[1]
        if how == "set_port":
            worker_env["SR3D_WORKER_METRICS_PORT"] = str(port)
        w = st.start_worker_defaults(worker_env)
        rc, seconds = wait_exit(w, 60)
        log = w.log_tail()
        assert rc == EXIT_METRICS_PORT, (rc, log)
        # Python start-up and imports only: a model load would build the demo checkpoint under `data`.
        assert seconds < 15, (seconds, log)
        assert not data.exists() or not any(data.iterdir()), sorted(p.name for p in data.iterdir())
        lines = [line for line in log.splitlines() if line.strip()]
        assert len(lines) == 1, log  # one clear line, no traceback
        assert f"{LOOPBACK}:{port} is already in use" in lines[0], lines[0]
        assert "SR3D_WORKER_METRICS_PORT" in lines[0] and "--metrics-port" in lines[0], lines[0]
        assert f"code {EXIT_METRICS_PORT}" in lines[0], lines[0]
        assert registrations(st.redis_url) == {}  # it never announced itself
    assert st.leaked == [], [p.log_tail(1500) for p in st.procs]


@pytest.mark.parametrize("broken", ["model_dir_missing", "redis_unreachable"])
def test_other_preconditions_end_the_worker_before_the_model_loads(tmp_path: Path, broken: str) -> None:
    from service.local_stack import free_port
    from service.worker_startup import EXIT_CONFIG, EXIT_REDIS, REDIS_PING_TIMEOUT_S

    data = tmp_path / "data"
    with Stack(tmp_path, {**FAULT_ENV, "SR3D_DATA_DIR": str(data)}) as st:
        if broken == "model_dir_missing":
            st.start_redis()
            w = st.start_worker_defaults({"SR3D_WORKER_METRICS_PORT": "0", "SR3D_MODEL": str(tmp_path / "no-such-checkpoint")})
            expect, within, words = EXIT_CONFIG, 15.0, ["SR3D_MODEL=", "is not a directory"]
        else:
            st.redis_port = free_port()  # nothing listens there
            w = st.start_worker_defaults({"SR3D_WORKER_METRICS_PORT": "0"})
            expect, within, words = EXIT_REDIS, REDIS_PING_TIMEOUT_S + 15, ["Redis at REDIS_URL did not answer", "before loading the model"]
        rc, seconds = wait_exit(w, within + 30)
        log = w.log_tail()
        assert rc == expect, (rc, log)
        assert seconds < within, (seconds, log)
        assert not data.exists() or not any(data.iterdir()), sorted(p.name for p in data.iterdir())
        errors = [line for line in log.splitlines() if line.startswith("sr3d worker:")]
        assert len(errors) == 1 and all(w_ in errors[0] for w_ in words), log
        assert "Traceback" not in log, log
    assert st.leaked == [], [p.log_tail(1500) for p in st.procs]


def test_metrics_port_zero_is_any_free_port_found_in_the_registration(tmp_path: Path, env: dict[str, str]) -> None:
    with Stack(tmp_path, env) as st:
        st.start_redis()
        w = st.start_worker_defaults({"SR3D_WORKER_METRICS_PORT": "0"})
        found: dict[str, dict[str, str]] = {}

        def registered() -> bool:
            assert w.alive(), w.log_tail()
            reg = registration_of(st.redis_url, w)
            if reg is not None:
                found["reg"] = reg
            return reg is not None

        wait_until(registered, 60, "the worker's registration")
        reg = found["reg"]
        port = int(reg["metrics_port"])
        assert port > 0 and reg["metrics_url"] == f"http://{LOOPBACK}:{port}/metrics", reg
        assert reg["metrics_port_rule"] == "0 = any free port" and reg["pid"] == str(w.pid), reg
        st.wait_ready(f"http://{LOOPBACK}:{port}", w)  # the registered port is the one it serves on
        assert httpx.get(f"http://{LOOPBACK}:{port}/metrics", timeout=5).status_code == 200
        wait_until(lambda: registration_of(st.redis_url, w).get("state") == "ready", 30, "state ready in the registration")  # type: ignore[union-attr]
        assert st.stop(w) == 0, w.log_tail()
        assert registration_of(st.redis_url, w) is None  # a clean stop removes it
    assert st.leaked == [], [p.log_tail(1500) for p in st.procs]


# ---------------------------------------------------------------- two workers, one host, default settings
@pytest.mark.parametrize("victim", ["first", "second"])
def test_two_workers_with_default_settings_survive_killing_either(tmp_path: Path, env: dict[str, str], victim: str) -> None:
    with Stack(tmp_path, env) as st:
        st.start_redis()
        gw, url = st.start_gateway()
        gpus = free_gpu_indexes(2)
        # Default settings: no SR3D_WORKER_METRICS_PORT, no --metrics-port; each worker pinned to its GPU
        # (on this CPU-only run SR3D_DEVICE=cpu, so the pin only picks the port).
        a = st.start_worker_defaults({"CUDA_VISIBLE_DEVICES": str(gpus[0])})
        b = st.start_worker_defaults({"CUDA_VISIBLE_DEVICES": str(gpus[1])})
        st.wait_ready(url, gw)
        for proc, gpu in ((a, gpus[0]), (b, gpus[1])):
            st.wait_ready(f"http://{LOOPBACK}:{BASE_METRICS_PORT + gpu}", proc)
        for proc, gpu in ((a, gpus[0]), (b, gpus[1])):
            reg = registration_of(st.redis_url, proc)
            assert reg is not None and reg["metrics_port"] == str(BASE_METRICS_PORT + gpu), reg
            assert reg["cuda_visible_devices"] == str(gpu), reg
        dead, survivor = (a, b) if victim == "first" else (b, a)
        killed: dict[str, Any] = {}

        def on_event(res: JobResult, ev: SSEEvent) -> None:
            starts = res.started_by
            if "pid" not in killed and ev.type == "token" and starts and consumer_is(starts[-1], dead.pid):
                killed["job"] = res.job_id
                os.kill(dead.pid, signal.SIGKILL)
                killed["pid"] = dead.pid

        async def load() -> list[JobResult]:
            async with SR3DClient(url) as c:
                reqs = mixed_requests(10, max_tokens=200, seed=31)  # long enough that the kill lands mid-answer
                return list(await asyncio.gather(*(c.run(r, on_event=on_event, resume_timeout_s=180) for r in reqs)))

        results = asyncio.run(load())
        assert "pid" in killed, (f"the {victim} worker never streamed a token (it got no job?)",
                                 [(r.http_status, r.error_body, r.started_by) for r in results])
        assert dead.wait(10) == -signal.SIGKILL
        # Every job: accepted, exactly one terminal event and it is `done`, no lost or repeated token.
        assert verdict(results) == []
        assert len(results) == 10 and all(r.terminal is not None and r.terminal.type == "done" for r in results)
        starters = {s for r in results for s in r.started_by}
        assert any(consumer_is(s, dead.pid) for s in starters) and any(consumer_is(s, survivor.pid) for s in starters), starters
        redelivered = [r for r in results if len(r.started_by) > 1]
        assert any(r.job_id == killed["job"] for r in redelivered)
        for r in redelivered:  # the killed worker's jobs went to the survivor, once
            starts = r.started_by
            assert len(starts) == 2 and consumer_is(starts[0], dead.pid) and consumer_is(starts[1], survivor.pid), starts
        wait_until(lambda: queue_state(st.redis_url)["pending"] == 0, 30, "acks of all jobs")
        assert queue_state(st.redis_url) == {"lag": 0, "pending": 0, "dlq": 0}
        # The dead worker's registration expires by itself; the survivor's stays.
        wait_until(lambda: registration_of(st.redis_url, dead) is None, 30, "the killed worker's registration to expire")
        assert registration_of(st.redis_url, survivor) is not None
        assert survivor.alive() and gw.alive()
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    assert st.leaked == [], [p.log_tail(1500) for p in st.procs]


# ---------------------------------------------------------------- the deployment files follow the same rule
ROOT = Path(__file__).resolve().parents[1]


def test_worker_images_pin_the_metrics_port_their_healthcheck_uses() -> None:
    from tests.test_deploy_docker import env_of

    for target in ("cpu-demo", "gpu"):
        env = env_of(target)
        # A container has its own network namespace: the GPU-index rule must not move the port off the healthcheck.
        assert env["SR3D_WORKER_METRICS_PORT"] == "9100", target
        assert env["SR3D_HEALTH_URL"] == "http://127.0.0.1:9100/healthz", target


def test_systemd_template_runs_one_worker_per_gpu_on_its_derived_port() -> None:
    import argparse
    import shlex

    from service.commands import worker as worker_cmd
    from service.worker_startup import EXIT_CONFIG, EXIT_REDIS

    unit = (ROOT / "deploy" / "systemd" / "sr3d-worker@.service").read_text()
    directives: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if line.strip() and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            directives.setdefault(key.strip(), []).append(value.strip())
    env = dict(v.split("=", 1) for v in directives["Environment"])
    assert env["CUDA_VISIBLE_DEVICES"] == "%i"  # instance name = GPU index
    assert "SR3D_WORKER_METRICS_PORT" not in env  # the port follows from the index: 9100 + %i
    assert "SR3D_WORKER_METRICS_PORT" not in "\n".join(line for line in unit.splitlines() if not line.startswith("#"))
    argv = shlex.split(directives["ExecStart"][0])
    assert Path(argv[0]).name == "sr3d"
    parser = argparse.ArgumentParser()
    worker_cmd.add(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv[1:])
    assert args.command == "worker" and args.metrics_port is None
    # SIGTERM drains for --drain-timeout; systemd must wait longer before its SIGKILL.
    assert float(directives["TimeoutStopSec"][0]) >= args.drain_timeout + 30
    no_restart = {int(c) for c in directives["RestartPreventExitStatus"][0].split()}
    assert no_restart == {EXIT_CONFIG, EXIT_METRICS_PORT} and EXIT_REDIS not in no_restart
