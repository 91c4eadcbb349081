"""CUDA MPS (Multi-Process Service) for one benchmark configuration: the worker's depth network and its
vLLM engine core are two processes on one GPU; without MPS the GPU time-slices between their contexts,
with MPS their kernels run side by side (vLLM's memory-bound decode steps next to depth's compute-bound
layers). MPS is a property of the machine, not of the service: a deployment enables it by running the
control daemon on the node or in the pod (README, "Sharing the GPU"); the bench starts a private one so
that a configuration with and one without can be compared in the same run.

`mps_daemon(directory, env)` starts `nvidia-cuda-mps-control -d` with its pipe and log directories under
`directory` and the GPUs of `env["CUDA_VISIBLE_DEVICES"]`, and yields the variables a client process needs
to find it; on exit it sends `quit` and waits for the daemon (and its server) to go.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"


class MPSUnavailable(RuntimeError):
    pass


def client_env(directory: Path, visible: str | None = None) -> dict[str, str]:
    """What a client process needs: the daemon's pipe, and GPU indices relative to the daemon's own
    CUDA_VISIBLE_DEVICES (`visible`): a client's CUDA_VISIBLE_DEVICES is read against the GPUs the MPS server
    sees, so a daemon on GPU 1 is reached with CUDA_VISIBLE_DEVICES=0 (with "1" the client finds no GPU:
    seen on the H200 machine)."""
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(directory / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(directory / "log")}
    if visible:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(visible.split(","))))
    return env


@contextmanager
def mps_daemon(directory: Path, env: dict[str, str] | None = None, control: str = CONTROL) -> Iterator[dict[str, str]]:
    exe = shutil.which(control)
    if exe is None:
        raise MPSUnavailable(f"{control} is not on PATH (CUDA MPS needs the NVIDIA driver's utilities)")
    daemon_env = {**os.environ, **(env or {})}
    cenv = client_env(directory, daemon_env.get("CUDA_VISIBLE_DEVICES"))
    dirs = {k: v for k, v in cenv.items() if k.startswith("CUDA_MPS_")}  # the daemon keeps its own GPU list
    for d in dirs.values():
        Path(d).mkdir(parents=True, exist_ok=True)
    full = {**daemon_env, **dirs}
    started = subprocess.run([exe, "-d"], env=full, capture_output=True, text=True, timeout=30)
    if started.returncode != 0:
        raise MPSUnavailable(f"{control} -d failed ({started.returncode}): {(started.stderr or started.stdout)[-500:]}")
    try:
        yield cenv
    finally:
        subprocess.run([exe], input="quit\n", env=full, capture_output=True, text=True, timeout=30)
        # `quit` returns at once; the daemon removes its pipe when it is gone (give it a moment).
        deadline = time.monotonic() + 10
        while (Path(cenv["CUDA_MPS_PIPE_DIRECTORY"]) / "control").exists() and time.monotonic() < deadline:
            time.sleep(0.1)


def check_client(directory: Path, env: dict[str, str] | None = None, timeout: float = 90.0) -> None:
    """One CUDA allocation through the daemon, before a worker is started on it: a daemon that cannot start
    its server would otherwise show up only as a worker that never gets ready (minutes of a GPU lease).
    `env`: the client environment `mps_daemon` yielded, merged over the worker's."""
    import sys

    code = "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"
    full = {**os.environ, **(env or {})}
    try:
        r = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MPSUnavailable(f"a CUDA client did not start through MPS within {timeout:.0f} s; {log_tail(directory)}") from None
    if r.returncode != 0:
        raise MPSUnavailable(f"a CUDA client failed through MPS: {r.stderr[-400:]}; {log_tail(directory)}")


def log_tail(directory: Path, limit: int = 800) -> str:
    """The daemon's control log (why a client was refused, for a configuration's problem report)."""
    path = directory / "log" / "control.log"
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""
