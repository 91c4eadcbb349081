"""What `sr3d worker` checks and claims BEFORE it loads a model, and the exit codes it ends with.

Loading weights and warming up takes seconds (demo) to minutes (8B on vLLM). Every precondition that
can fail cheaply is checked first, so a misconfigured worker ends in about a second with one line on
stderr, instead of loading a whole model and then dying where nothing notices (issue 31: a second
worker on one host found 127.0.0.1:9100 taken only after its model load, and its HTTP task died
unobserved while the process went away).

Metrics port rule (SR3D_WORKER_METRICS_PORT, `--metrics-port`):
* set: exactly that port; 0 = any free port, chosen by the kernel at bind time.
* unset: 9100 + the first GPU index in CUDA_VISIBLE_DEVICES, or 9100 when it names no index
  (unset, empty, GPU/MIG UUIDs).
Why derive it from the GPU: one worker per GPU on one host is the common multi-GPU layout, and each
of those workers must be pinned to its GPU with CUDA_VISIBLE_DEVICES anyway (otherwise every worker
loads onto GPU 0). Pinned workers get distinct, predictable ports (9100..9107 on an 8-GPU host) that a
static Prometheus config can list, with no further setting. Two workers that share a GPU index (or
have none) still collide, and that ends the second one at once with a line that says how to fix it:
a collision is a misconfiguration, so there is no silent "try the next port" fallback, which would
leave Prometheus scraping the wrong worker or none.
Containers and pods have a network namespace each: the images pin 9100 explicitly (Dockerfile), so
the rule never moves a container's port away from its probes and scrape config.
"""
from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from service.settings import WorkerSettings

# Exit codes of `sr3d worker` (README, "Command line"). Distinct from uvicorn's 3, which the worker
# used to die with late; systemd's RestartPreventExitStatus= can stop restarts on 2 and 4.
EXIT_OK = 0  # stopped by SIGTERM/SIGINT after draining
EXIT_FAILED = 1  # unexpected failure after start-up (the traceback is in the log)
EXIT_CONFIG = 2  # a variable its settings refuse, REDIS_URL unset, a model directory that does not exist, an unwritable data dir
EXIT_METRICS_PORT = 4  # the metrics address cannot be bound (port in use, not permitted, unknown host)
EXIT_REDIS = 5  # Redis did not answer a PING within REDIS_PING_TIMEOUT_S at start-up

BASE_METRICS_PORT = 9100
# A Redis that is starting alongside the worker (compose without a healthcheck, a pod restarted at the
# same time) answers within a few seconds; this stays far below any model load.
REDIS_PING_TIMEOUT_S = 15.0


class StartupError(Exception):
    """A precondition failed: `line` is the single stderr line, `code` the exit code."""

    def __init__(self, code: int, line: str) -> None:
        super().__init__(line)
        self.code = code
        self.line = line


def first_gpu_index(cuda_visible_devices: str | None) -> int | None:
    """The first entry of CUDA_VISIBLE_DEVICES when it is a GPU index ("2" in "2,3"); None otherwise."""
    if not cuda_visible_devices:
        return None
    first = cuda_visible_devices.split(",")[0].strip()
    return int(first) if first.isdigit() else None


@dataclass(frozen=True)
class PortChoice:
    port: int  # 0 = any free port
    rule: str  # how it was chosen, for the log line and the registration


def choose_metrics_port(configured: int | None, cuda_visible_devices: str | None) -> PortChoice:
    if configured is not None:
        return PortChoice(configured, "0 = any free port" if configured == 0 else "set")
    index = first_gpu_index(cuda_visible_devices)
    if index is None:
        return PortChoice(BASE_METRICS_PORT, "default 9100 (no GPU index in CUDA_VISIBLE_DEVICES)")
    return PortChoice(BASE_METRICS_PORT + index, f"9100 + GPU index {index} (CUDA_VISIBLE_DEVICES={cuda_visible_devices})")


_FIX = ("give each worker on this host its own port: SR3D_WORKER_METRICS_PORT=<port> or --metrics-port <port> "
        "(0 = any free port), or pin each worker to its GPU with CUDA_VISIBLE_DEVICES=<index> (port 9100 + index)")


def bind_metrics_socket(host: str, choice: PortChoice) -> socket.socket:
    """Bind and listen now (uvicorn serves on this socket later); StartupError(EXIT_METRICS_PORT) if not."""
    where = f"{host}:{choice.port}"
    if not 0 <= choice.port <= 65535:
        raise StartupError(EXIT_CONFIG, f"sr3d worker: metrics port {choice.port} ({choice.rule}) is not a TCP port; set SR3D_WORKER_METRICS_PORT or --metrics-port to 0..65535")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, choice.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise StartupError(EXIT_METRICS_PORT, f"sr3d worker: metrics host {host!r} does not resolve ({e.strerror}); "
                                              "set SR3D_WORKER_METRICS_HOST or --metrics-host") from None
    sock = socket.socket(family, kind, proto)
    try:
        # As uvicorn does: a restart may rebind while old connections sit in TIME_WAIT. A port another
        # process LISTENS on still fails (Linux), and listen() right away means two workers binding at
        # the same instant cannot both win.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            why = f"is already in use (another worker on this host? port chosen by: {choice.rule})"
        elif e.errno == errno.EACCES:
            why = "is not permitted (ports below 1024 need privileges)"
        elif e.errno == errno.EADDRNOTAVAIL:
            why = "names an address this host does not have (SR3D_WORKER_METRICS_HOST / --metrics-host)"
        else:
            why = f"cannot be bound ({e.strerror})"
        raise StartupError(EXIT_METRICS_PORT, f"sr3d worker: metrics address {where} {why}; {_FIX}. "
                                              f"Exiting with code {EXIT_METRICS_PORT} before loading the model.") from None
    sock.setblocking(False)
    return sock


def check_paths(settings: WorkerSettings) -> None:
    """Model directories that are set must exist; the data dir must be creatable (demo checkpoints, caches)."""
    for env, value in (("SR3D_MODEL", settings.model), ("SR3D_DEPTH_MODEL", settings.depth_model),
                       ("SR3D_MULTIVIEW_MODEL", settings.multiview_model)):
        if value and not Path(value).is_dir():
            raise StartupError(EXIT_CONFIG, f"sr3d worker: {env}={value} is not a directory; mount the checkpoint there or unset {env} for the tiny demo model")
    # Both are created on first use (DirBlobStore, the demo checkpoint builder): they must be, or be creatable.
    if settings.blob_store == "dir" and not _usable_dir(settings.resolved_blob_dir):
        raise StartupError(EXIT_CONFIG, f"sr3d worker: SR3D_BLOB_STORE=dir but {settings.resolved_blob_dir} cannot be created or written "
                                        "by this user; mount the directory the gateway writes uploads to (SR3D_BLOB_DIR)")
    if not _usable_dir(settings.data_dir):
        raise StartupError(EXIT_CONFIG, f"sr3d worker: SR3D_DATA_DIR={settings.data_dir} cannot be created or written by this user; "
                                        "point it at a writable directory")


def _usable_dir(path: Path) -> bool:
    """A writable directory, or one this user can create (its nearest existing ancestor is writable)."""
    probe = path if path.exists() else next((p for p in path.resolve().parents if p.exists()), None)
    return probe is not None and probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)
