"""Blob store for uploads (video/image, mask PNGs, scene npz). Redis holds pointers (keys) only in
job specs; the bytes live here.

- `RedisBlobStore`: `sr3d:blob:{key}` is a Redis list of chunks (SR3D_BLOB_CHUNK_BYTES each),
  because single values of many MB stall the server; total size capped.
- `DirBlobStore`: files under SR3D_BLOB_DIR (a directory shared by gateway and workers). A file's
  mtime is its expiry deadline; `sweep()` deletes expired files.

Keys look like `{job_id}/media`, `{job_id}/mask/{name}`; only [A-Za-z0-9._-/] and no `..`.
"""
from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

import redis.asyncio as aioredis

from service.keys import BLOB_PREFIX
from service.errors import ApiError
from service.redis_conn import clone_client
from service.settings import StoreSettings


_KEY = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
_READ = 1 << 20

BlobData = bytes | Path | BinaryIO


class BlobNotFound(KeyError):
    pass


class BlobTooLarge(ValueError):
    pass


class BlobStoreFull(ApiError):
    """Redis is above the upload high-water mark: refuse the upload (503 + Retry-After) while queue,
    event and job-hash writes still have room (the server runs `maxmemory-policy noeviction`)."""

    def __init__(self, used: int, limit: int, retry_after_s: int = 5) -> None:
        super().__init__("upload_store_full", f"the upload store is full ({used} of {limit} bytes in use); retry later",
                         {"Retry-After": str(retry_after_s)})


def _size_of(data: BlobData) -> int:
    if isinstance(data, bytes):
        return len(data)
    if isinstance(data, Path):
        return data.stat().st_size
    data.seek(0, os.SEEK_END)
    size = data.tell()
    data.seek(0)
    return size


def check_key(key: str) -> str:
    if not _KEY.match(key) or ".." in key.split("/"):
        raise ValueError(f"invalid blob key {key!r}")
    return key


def _chunks(data: BlobData, size: int) -> Iterator[bytes]:
    # A generator: a file is never held in memory whole.
    if isinstance(data, bytes):
        yield from (data[i : i + size] for i in range(0, len(data), size))
    elif isinstance(data, Path):
        with open(data, "rb") as f:
            yield from iter(lambda: f.read(size), b"")
    else:
        data.seek(0)
        yield from iter(lambda: data.read(size), b"")


class BlobStore(Protocol):
    async def put(self, key: str, data: BlobData, ttl_s: int | None = None) -> int:
        """Store `data` (bytes, a file path, or a binary file object read from its start) under
        `key`; returns the size. Raises BlobTooLarge over the store's cap. `ttl_s` = auto-delete."""

    async def get(self, key: str) -> bytes:
        """The whole blob; raises BlobNotFound."""

    def open_path(self, key: str, suffix: str = "") -> AbstractAsyncContextManager[Path]:
        """`async with store.open_path(key) as path:` a local file with the blob's bytes (PyAV needs
        a file). Temporary for the Redis store; removed on exit. Raises BlobNotFound."""

    async def delete(self, key: str) -> None: ...

    async def expire(self, key: str, ttl_s: int) -> None:
        """Delete the blob `ttl_s` seconds from now (set after the job reaches a terminal state)."""

    async def exists(self, key: str) -> bool: ...


async def check_redis_room(redis: aioredis.Redis, size: int, high_water: float) -> None:
    """Raise BlobStoreFull when storing `size` more bytes would take Redis past high_water x
    maxmemory. No maxmemory set (0) = no check: the operator chose an unbounded server. Everything
    large that lives in Redis checks it: uploads (RedisBlobStore.put) and finished jobs' 3D scenes
    (service/jobs/scenes.py), so queue, event and job-hash writes always keep the rest."""
    used, limit = await redis_memory(redis)
    if over_high_water(used, size, limit, high_water):
        raise BlobStoreFull(used, limit)


async def redis_memory(redis: aioredis.Redis) -> tuple[int, int]:
    """Redis's (used_memory, maxmemory) in bytes; maxmemory 0 = unbounded."""
    info = await redis.info("memory")
    return int(info.get("used_memory", 0) or 0), int(info.get("maxmemory", 0) or 0)


def over_high_water(used: int, size: int, limit: int, high_water: float) -> bool:
    """Whether `size` more bytes take Redis past high_water x maxmemory (never with no maxmemory)."""
    return bool(limit) and used + size > high_water * limit


class MemoryGauge:
    """`check_redis_room` for one process's uploads, with Redis's memory read at most every `max_age_s`
    instead of on every put (an INFO round trip is one more event-loop turn per upload). Safe because:
    this process's own puts since the read are added to it at once; what other processes wrote in that
    fraction of a second is at most a few uploads, far inside the room between the high-water mark and
    maxmemory (30 % at the default 0.7), which the server itself still enforces (noeviction refuses
    writes past it); and a refusal is always re-checked against a fresh read, so a stale value never
    refuses an upload that fits."""

    def __init__(self, redis: aioredis.Redis, high_water: float, max_age_s: float = 0.2) -> None:
        self.redis = redis
        self.high_water = high_water
        self.max_age_s = max_age_s
        self._read_at = -math.inf
        self._used = self._limit = 0

    async def _read(self) -> None:
        self._used, self._limit = await redis_memory(self.redis)
        self._read_at = time.monotonic()

    def _over(self, size: int) -> bool:
        return over_high_water(self._used, size, self._limit, self.high_water)

    async def check(self, size: int) -> None:
        if time.monotonic() - self._read_at > self.max_age_s:
            await self._read()
        if self._over(size):
            await self._read()  # refuse on a fresh value only
            if self._over(size):
                raise BlobStoreFull(self._used, self._limit)
        self._used += size


class RedisBlobStore:
    def __init__(
        self, redis: aioredis.Redis, max_bytes: int, chunk_bytes: int = 1 << 20, default_ttl_s: int = 86400,
        high_water: float = 0.7,
    ) -> None:
        # Blobs are bytes: a client of the same server with decode_responses=False.
        self.redis = clone_client(redis, decode_responses=False)
        self.max_bytes = max_bytes
        self.chunk_bytes = chunk_bytes
        self.default_ttl_s = default_ttl_s
        self.high_water = high_water
        self._gauge = MemoryGauge(self.redis, high_water)

    async def check_room(self, size: int) -> None:
        await self._gauge.check(size)

    async def put(self, key: str, data: BlobData, ttl_s: int | None = None) -> int:
        name = BLOB_PREFIX + check_key(key)
        await self.check_room(_size_of(data))
        tmp = f"{name}:partial:{os.getpid()}:{time.monotonic_ns()}"
        total = 0
        try:
            # One RPUSH per chunk: batching 8 chunks per round trip measured ~2.8x slower to write and
            # ~1.8x slower to read (`sr3d bench blobs`, loadtests/results/blobs.json): a round trip
            # costs microseconds, an 8 MiB command costs copies on both sides.
            for chunk in _chunks(data, self.chunk_bytes):
                total += len(chunk)
                if total > self.max_bytes:
                    raise BlobTooLarge(f"blob {key} is over {self.max_bytes} bytes")
                await self.redis.rpush(tmp, chunk)
            async with self.redis.pipeline(transaction=True) as pipe:
                if total == 0:
                    pipe.rpush(tmp, b"")
                pipe.rename(tmp, name)  # readers never see a half-written blob
                pipe.expire(name, ttl_s or self.default_ttl_s)
                await pipe.execute()
        except BaseException:
            await self.redis.delete(tmp)
            raise
        return total

    async def get(self, key: str) -> bytes:
        name = BLOB_PREFIX + check_key(key)
        parts = await self.redis.lrange(name, 0, -1)
        if not parts:
            raise BlobNotFound(key)
        return b"".join(parts)

    @asynccontextmanager
    async def open_path(self, key: str, suffix: str = "") -> AsyncIterator[Path]:
        name = BLOB_PREFIX + check_key(key)
        n = await self.redis.llen(name)
        if n == 0:
            raise BlobNotFound(key)
        fd, path = tempfile.mkstemp(prefix="sr3d-blob-", suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                for i in range(n):  # chunk by chunk, so the blob is never in memory whole
                    f.write(await self.redis.lindex(name, i) or b"")
            yield Path(path)
        finally:
            os.unlink(path)

    async def delete(self, key: str) -> None:
        await self.redis.delete(BLOB_PREFIX + check_key(key))

    async def expire(self, key: str, ttl_s: int) -> None:
        await self.redis.expire(BLOB_PREFIX + check_key(key), ttl_s)

    async def exists(self, key: str) -> bool:
        return bool(await self.redis.exists(BLOB_PREFIX + check_key(key)))

    async def aclose(self) -> None:
        await self.redis.aclose()


class DirBlobStore:
    def __init__(self, directory: Path, max_bytes: int, default_ttl_s: int = 86400) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.default_ttl_s = default_ttl_s

    def _path(self, key: str) -> Path:
        return self.directory / check_key(key)

    def _put_sync(self, key: str, data: BlobData, ttl_s: int | None) -> int:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        total = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in _chunks(data, _READ):
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise BlobTooLarge(f"blob {key} is over {self.max_bytes} bytes")
                    f.write(chunk)
            deadline = time.time() + (ttl_s or self.default_ttl_s)
            os.utime(tmp, (deadline, deadline))
            os.replace(tmp, path)  # atomic: readers never see a half-written file
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return total

    async def put(self, key: str, data: BlobData, ttl_s: int | None = None) -> int:
        return await asyncio.to_thread(self._put_sync, key, data, ttl_s)

    async def get(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread(self._path(key).read_bytes)
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    @asynccontextmanager
    async def open_path(self, key: str, suffix: str = "") -> AsyncIterator[Path]:
        path = self._path(key)
        if not path.exists():
            raise BlobNotFound(key)
        yield path

    async def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    async def expire(self, key: str, ttl_s: int) -> None:
        path = self._path(key)
        deadline = time.time() + ttl_s
        try:
            os.utime(path, (deadline, deadline))
        except FileNotFoundError:
            pass

    async def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def sweep(self, now: float | None = None) -> int:
        """Delete blobs whose deadline (mtime) has passed; returns how many. Empty dirs go too."""
        now = time.time() if now is None else now
        removed = 0
        for root, dirs, files in os.walk(self.directory, topdown=False):
            for name in files:
                p = Path(root) / name
                try:
                    if p.stat().st_mtime < now:
                        p.unlink()
                        removed += 1
                except FileNotFoundError:
                    pass
            if Path(root) != self.directory and not os.listdir(root):
                shutil.rmtree(root, ignore_errors=True)
        return removed

    async def aclose(self) -> None:
        return None


def make_blob_store(settings: StoreSettings, redis: aioredis.Redis) -> RedisBlobStore | DirBlobStore:
    """The store SR3D_BLOB_STORE names. Each blob is capped at the upload cap."""
    if settings.blob_store == "dir":
        return DirBlobStore(settings.resolved_blob_dir, settings.max_upload_bytes, settings.job_max_age_s)
    return RedisBlobStore(redis, settings.max_upload_bytes, settings.blob_chunk_bytes, settings.job_max_age_s,
                          settings.blob_redis_high_water)
