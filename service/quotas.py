"""Per-key quotas (issue 30 items 1, 6 and 10): what one API key may hold, so that one tenant cannot
lock the others out of shared room (the blob store's high-water mark, the queue, the stream hub,
the gateway's memory and temp disk). A key over a quota gets 429 with its own code and Retry-After;
other keys are unaffected. "Key" = the API key's id (`Caller.tenant`). With keys off there are no
tenants to keep apart, and one client address is no tenant either (behind a load balancer every
request has the balancer's): the quotas are off then, and the deployment-wide bounds (queue_max,
sse_max_clients, the blob store's high-water mark) are what holds. Every method takes `None` as
"no tenant" and then reserves nothing.

  Ledger (Redis, shared by every gateway replica):
    files stored through POST /v1/files        SR3D_QUOTA_FILES        files_quota_exceeded
    bytes held: its files + the uploads of     SR3D_QUOTA_STORED_MB    storage_quota_exceeded
      its unfinished jobs
    jobs queued or running                     SR3D_QUOTA_JOBS         jobs_quota_exceeded
  In-process (per gateway process):
    request bodies being received at once      SR3D_QUOTA_UPLOADS      uploads_quota_exceeded
    event streams open                         SR3D_QUOTA_STREAMS      streams_quota_exceeded (service/stream_hub.py)
    request-body bytes per second              SR3D_QUOTA_UPLOAD_MIB_S (no refusal: read more slowly, `BodyPacer`)

The ledger is two Redis keys per key (service/keys.py): a sorted set of what it holds (`file:<id>`,
`job:<id>`, `pending:<token>`), scored by the deadline after which the entry is void whatever
happens, and a hash of each entry's bytes. A job's entry leaves when the job is terminal (its blobs
are deleted then) or gone; a file's when it is deleted or expires. Entries are checked and
reserved in one Lua call, so concurrent requests of one key cannot both take the last slot; the
same call first drops the key's ended jobs (at most SR3D_QUOTA_JOBS job hashes read, in Redis).
Multipart bodies with a Content-Length are checked against it (an upper bound on their files)
before they are read: an 8 MiB upload past the quota is refused before its bytes are received.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import redis.asyncio as aioredis

from service.errors import ApiError
from service.keys import job_key, tenant_bytes_key, tenant_held_key
from service.settings import GatewaySettings

# Room a request reserves while it stores its uploads, before it knows its job id; void after this
# long if the gateway died in between.
PENDING_S = 600

_RESERVE = """
local held, sizes = KEYS[1], KEYS[2]
local member, nbytes, deadline = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local prefix, max_count, max_bytes, ttl = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local pending, job_prefix = ARGV[8], ARGV[10]
redis.call('ZREMRANGEBYSCORE', held, '-inf', ARGV[9])
for _, m in ipairs(redis.call('ZRANGE', held, 0, -1)) do
  if string.sub(m, 1, 4) == 'job:' then
    local st = redis.call('HGET', job_prefix .. string.sub(m, 5), 'status')
    if not st or st == 'done' or st == 'failed' or st == 'cancelled' then redis.call('ZREM', held, m) end
  end
end
local flat = redis.call('HGETALL', sizes)
local total, count = 0, 0
for i = 1, #flat, 2 do
  if redis.call('ZSCORE', held, flat[i]) then
    total = total + tonumber(flat[i + 1])
    if string.sub(flat[i], 1, #prefix) == prefix or string.sub(flat[i], 1, #pending) == pending then
      count = count + 1
    end
  else
    redis.call('HDEL', sizes, flat[i])
  end
end
if count + 1 > max_count then return {1, tostring(count), tostring(total)} end
if total + nbytes > max_bytes then return {2, tostring(count), tostring(total)} end
redis.call('ZADD', held, deadline, member)
redis.call('HSET', sizes, member, nbytes)
redis.call('EXPIRE', held, ttl)
redis.call('EXPIRE', sizes, ttl)
return {0, tostring(count + 1), tostring(total + nbytes)}
"""

# A request body's Content-Length is an upper bound on the bytes of the files in it; these many bytes
# of it may be multipart framing and text fields (boundaries, part headers, question, regions).
FRAMING_BYTES = 64 * 1024


def declared_length(headers: Mapping[str, str]) -> int | None:
    """The body's Content-Length, None when absent or unreadable (chunked: counted as it arrives)."""
    try:
        value = int(headers.get("content-length", ""))
    except ValueError:
        return None
    return value if value >= 0 else None


class Ledger:
    """Files, bytes and jobs held per key, in Redis. Each check-and-reserve is one round trip (one Lua
    call that also drops the key's ended jobs), so a tenant's request waits one event-loop turn for it."""

    def __init__(self, redis: aioredis.Redis, settings: GatewaySettings) -> None:
        self.redis = redis
        self.settings = settings
        self._script = redis.register_script(_RESERVE)

    # ---- files -----------------------------------------------------------------------------------
    async def reserve_file(self, bucket: str | None, file_id: str, nbytes: int, expires_at: float,
                           *, declared: bool = False) -> bool:
        """Reserve `nbytes` for a file. `declared`: nbytes is the request's Content-Length, before its
        body is read: refused at once when even its file part alone could not fit (the client is
        answered before it sends the rest), False (nothing reserved: reserve the exact size once the
        body is read) when only the framing makes it over. Then the entry holds the upper bound until
        `settle` (service/api/openai_media.py writes the exact size with the file's metadata)."""
        if bucket is None:
            return True
        return await self._reserve(bucket, f"file:{file_id}", nbytes, expires_at, "file:", self.settings.quota_files,
                                   "files_quota_exceeded", "stored files", declared=declared)

    # ---- jobs ------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def job_slot(self, bucket: str | None, nbytes: int | None = None) -> AsyncIterator[JobSlot]:
        """Room for one job, reserved before its uploads are stored: for `nbytes` here, or later with
        `slot.reserve`. Inside, call `slot.bind(job_id, created)` once the job is queued; any exception
        (or no bind) frees it."""
        slot = JobSlot(self, bucket, f"pending:{uuid.uuid4().hex}", 0)
        try:
            if nbytes is not None:
                await slot.reserve(nbytes)
            yield slot
        finally:
            if slot.reserved and not slot.bound and bucket is not None:
                await self.release(bucket, slot.member)

    async def _bind(self, slot: JobSlot, job_id: str) -> None:
        member = f"job:{job_id}"
        deadline = time.time() + self.settings.job_max_age_s
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(tenant_held_key(slot.bucket), {member: deadline})
            pipe.hset(tenant_bytes_key(slot.bucket), member, slot.nbytes)
            pipe.zrem(tenant_held_key(slot.bucket), slot.member)
            pipe.hdel(tenant_bytes_key(slot.bucket), slot.member)
            pipe.expire(tenant_held_key(slot.bucket), self._ttl())
            pipe.expire(tenant_bytes_key(slot.bucket), self._ttl())
            await pipe.execute()

    # ---- shared ----------------------------------------------------------------------------------
    async def release(self, bucket: str | None, *members: str) -> None:
        if bucket is None:
            return
        if members:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(tenant_held_key(bucket), *members)
                pipe.hdel(tenant_bytes_key(bucket), *members)
                await pipe.execute()

    def settle(self, pipe: Any, bucket: str | None, member: str, nbytes: int) -> None:
        """Queue, in the caller's pipeline, the exact size of an entry reserved at an upper bound."""
        if bucket is not None:
            pipe.hset(tenant_bytes_key(bucket), member, nbytes)

    def _ttl(self) -> int:
        return max(self.settings.job_max_age_s, self.settings.files_ttl_s, PENDING_S) + 60

    async def _reserve(self, bucket: str, member: str, nbytes: int, deadline: float, prefix: str, max_count: int,
                       count_code: str, what: str, *, declared: bool = False) -> bool:
        now = time.time()
        verdict, count, total = await self._script(
            keys=[tenant_held_key(bucket), tenant_bytes_key(bucket)],
            args=[member, nbytes, repr(deadline), prefix, max_count, self.settings.quota_stored_bytes, self._ttl(),
                  "pending:" if prefix == "job:" else "\0", repr(now), job_key("")])
        verdict = int(verdict)
        if verdict == 0:
            return True
        if verdict == 2 and declared and int(total) + max(0, nbytes - FRAMING_BYTES) <= self.settings.quota_stored_bytes:
            return False  # the files themselves may fit: decide on their exact size
        retry = str(await self._retry_after(bucket, prefix, now))
        if verdict == 1:
            raise ApiError(count_code, f"this API key holds {count} {what}, its quota is {max_count}; "
                           "wait for some to finish or expire, or delete files", {"Retry-After": retry})
        raise ApiError("storage_quota_exceeded", f"this API key holds {total} bytes of files and job uploads; "
                       f"{nbytes} more would pass its quota of {self.settings.quota_stored_bytes} bytes",
                       {"Retry-After": retry})

    async def _retry_after(self, bucket: str, prefix: str, now: float) -> int:
        """Seconds until the key's earliest file expires (for files); the usual retry otherwise (a
        job's end cannot be predicted)."""
        if prefix == "file:":
            first = await self.redis.zrange(tenant_held_key(bucket), 0, 0, withscores=True)
            if first:
                return max(1, min(math.ceil(float(first[0][1]) - now), self.settings.files_ttl_s))
        return self.settings.retry_after_s


@dataclass
class JobSlot:
    ledger: Ledger
    bucket: str | None  # None: no tenant, nothing reserved
    member: str
    nbytes: int
    reserved: bool = False
    bound: bool = False

    async def reserve(self, nbytes: int, *, declared: bool = False) -> bool:
        """Reserve the job's place and `nbytes` (see Ledger.reserve_file for `declared`). True once
        reserved; False (declared only) when the exact size must decide."""
        if self.bucket is None:
            self.reserved = True
            return True
        self.reserved = await self.ledger._reserve(
            self.bucket, self.member, nbytes, time.time() + PENDING_S, "job:", self.ledger.settings.quota_jobs,
            "jobs_quota_exceeded", "jobs queued or running", declared=declared)
        if self.reserved:
            self.nbytes = nbytes
        return self.reserved

    async def bind(self, job_id: str, created: bool, nbytes: int | None = None) -> None:
        """The reservation becomes the job's (created, holding `nbytes`: its exact uploads, when it
        was reserved at the body's Content-Length) or is freed (an idempotent replay: no new job)."""
        if nbytes is not None:
            self.nbytes = nbytes
        if created and self.bucket is not None:
            await self.ledger._bind(self, job_id)
            self.bound = True


def files_size(*files: BinaryIO | None) -> int:
    """Total bytes of open files (each left at position 0)."""
    total = 0
    for f in files:
        if f is not None:
            total += f.seek(0, os.SEEK_END)
            f.seek(0)
    return total


class UploadSlots:
    """Request bodies being received at once, per key, in this gateway process. A body is held (in
    memory for JSON, spooled to temp disk for multipart) until it is complete; 300 stalled uploads
    of one client spooled 600 MB (issue 30 item 10)."""

    def __init__(self, per_key: int, retry_after_s: int) -> None:
        self.per_key = per_key
        self.retry_after_s = retry_after_s
        self._open: dict[str, int] = {}

    def open(self, bucket: str) -> int:
        return self._open.get(bucket, 0)

    @contextlib.contextmanager
    def hold(self, bucket: str | None) -> Iterator[None]:
        if bucket is None:
            yield
            return
        if self._open.get(bucket, 0) >= self.per_key:
            raise ApiError("uploads_quota_exceeded", f"this API key is already sending {self.per_key} request bodies "
                           "to this gateway; wait for one to finish", {"Retry-After": str(self.retry_after_s)})
        self._open[bucket] = self._open.get(bucket, 0) + 1
        try:
            yield
        finally:
            left = self._open[bucket] - 1
            if left:
                self._open[bucket] = left
            else:
                del self._open[bucket]


class BodyPacer:
    """Request-body bytes per key per second in this gateway process. Parsing a body costs the event
    loop for every byte (multipart: 18 ms of CPU per 8 MiB), and one key sending bodies back to back
    took 0.13 of a CPU from a loop every key shares. Past its rate a key's next chunk is handed to the
    app only when the key's budget allows: meanwhile uvicorn stops reading that socket (its buffer is
    full) and TCP pushes back on the client, which costs nothing. Other keys are never delayed, and no
    request is refused for it. A burst of one second's worth passes unpaced, so an occasional large
    upload is not slowed.

    One virtual clock per key (GCRA): each chunk moves the key's clock on by its bytes / rate; a chunk
    waits until the clock is less than the burst ahead of now. Every body of the key shares the clock."""

    def __init__(self, mib_per_s: float) -> None:
        self.rate = mib_per_s * (1 << 20)
        self.burst_s = 1.0
        self._clock: dict[str, float] = {}

    async def take(self, bucket: str | None, nbytes: int) -> None:
        if bucket is None or self.rate <= 0 or nbytes <= 0:
            return
        now = time.monotonic()
        clock = max(self._clock.get(bucket, now), now) + nbytes / self.rate
        self._clock[bucket] = clock
        wait = clock - now - self.burst_s
        if wait > 0:
            await asyncio.sleep(wait)
        else:
            self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        # Keys whose clock is behind now owe nothing: dropping them keeps the map at the keys sending now.
        if len(self._clock) > 64:
            for key in [k for k, c in self._clock.items() if c < now]:
                del self._clock[key]
