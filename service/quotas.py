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

The ledger is two Redis keys per key (service/keys.py): a sorted set of what it holds (`file:<id>`,
`job:<id>`, `pending:<token>`), scored by the deadline after which the entry is void whatever
happens, and a hash of each entry's bytes. A job's entry leaves when the job is terminal (its blobs
are deleted then) or gone; a file's when it is deleted or expires. Entries are checked and
reserved in one Lua call, so concurrent requests of one key cannot both take the last slot; the
job-status pruning before it reads at most SR3D_QUOTA_JOBS job hashes.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import BinaryIO

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
local pending = ARGV[8]
redis.call('ZREMRANGEBYSCORE', held, '-inf', ARGV[9])
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


class Ledger:
    """Files, bytes and jobs held per key, in Redis."""

    def __init__(self, redis: aioredis.Redis, settings: GatewaySettings) -> None:
        self.redis = redis
        self.settings = settings
        self._script = redis.register_script(_RESERVE)

    # ---- files -----------------------------------------------------------------------------------
    async def reserve_file(self, bucket: str | None, file_id: str, nbytes: int, expires_at: float) -> None:
        if bucket is None:
            return
        await self._prune_jobs(bucket)  # finished jobs' uploads are gone: they no longer count as bytes held
        await self._reserve(bucket, f"file:{file_id}", nbytes, expires_at, "file:", self.settings.quota_files,
                            "files_quota_exceeded", "stored files")

    # ---- jobs ------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def job_slot(self, bucket: str | None, nbytes: int) -> AsyncIterator[JobSlot]:
        """Room for one job of `nbytes` of uploads, reserved before they are stored. Inside, call
        `slot.bind(job_id, created)` once the job is queued; any exception (or no bind) frees it."""
        if bucket is None:
            yield JobSlot(self, None, "", nbytes)
            return
        await self._prune_jobs(bucket)
        slot = JobSlot(self, bucket, f"pending:{uuid.uuid4().hex}", nbytes)
        await self._reserve(bucket, slot.member, nbytes, time.time() + PENDING_S, "job:", self.settings.quota_jobs,
                            "jobs_quota_exceeded", "jobs queued or running")
        try:
            yield slot
        finally:
            if not slot.bound:
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

    async def _prune_jobs(self, bucket: str) -> None:
        """Drop the jobs of `bucket` that are terminal or gone: their uploads were deleted then."""
        members = [m for m in await self.redis.zrange(tenant_held_key(bucket), 0, -1) if m.startswith("job:")]
        if not members:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for m in members:
                pipe.hget(job_key(m[4:]), "status")
            statuses = await pipe.execute()
        gone = [m for m, st in zip(members, statuses) if st is None or st in ("done", "failed", "cancelled")]
        if gone:
            await self.release(bucket, *gone)

    # ---- shared ----------------------------------------------------------------------------------
    async def release(self, bucket: str | None, *members: str) -> None:
        if bucket is None:
            return
        if members:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(tenant_held_key(bucket), *members)
                pipe.hdel(tenant_bytes_key(bucket), *members)
                await pipe.execute()

    def _ttl(self) -> int:
        return max(self.settings.job_max_age_s, self.settings.files_ttl_s, PENDING_S) + 60

    async def _reserve(self, bucket: str, member: str, nbytes: int, deadline: float, prefix: str, max_count: int,
                       count_code: str, what: str) -> None:
        now = time.time()
        verdict, count, total = await self._script(
            keys=[tenant_held_key(bucket), tenant_bytes_key(bucket)],
            args=[member, nbytes, repr(deadline), prefix, max_count, self.settings.quota_stored_bytes, self._ttl(),
                  "pending:" if prefix == "job:" else "\0", repr(now)])
        verdict = int(verdict)
        if verdict == 0:
            return
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
    bound: bool = False

    async def bind(self, job_id: str, created: bool) -> None:
        """The reservation becomes the job's (created) or is freed (an idempotent replay: no new job)."""
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

