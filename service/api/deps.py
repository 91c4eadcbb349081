"""The gateway's state and its FastAPI dependencies: who is calling (API key), whether they may
(rate limit), and whether a job is theirs. Routers import these; nothing here knows a route."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from fastapi import Depends, Request
from redis.exceptions import RedisError

from service.blobs import BlobStore, DirBlobStore, make_blob_store
from service.errors import ApiError
from service.jobs import Jobs
from service.logging import bind_job
from service.quotas import Ledger, UploadSlots
from service.ratelimit import RateLimiter
from service.redis_conn import EmbeddedRedis, redis_client, resolve_redis_url
from service.schemas import JobSpec, JobView
from service.settings import Settings
from service.stream_hub import StreamHub

log = logging.getLogger("sr3d.gateway")

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class GatewayState:
    settings: Settings
    redis: aioredis.Redis
    jobs: Jobs  # every job's record, events and queue (service/jobs/)
    blobs: BlobStore
    limiter: RateLimiter
    hub: StreamHub  # every event stream of this process (SSE, ?wait=true) reads through it
    ledger: Ledger  # per-key files, bytes and jobs held (service/quotas.py)
    uploads: UploadSlots  # per-key request bodies being received by this process


@contextlib.asynccontextmanager
async def open_state(settings: Settings) -> AsyncIterator[GatewayState]:
    """Connections for one gateway process. Redis: REDIS_URL, else the embedded server under
    SR3D_DATA_DIR. A directory blob store also gets its expiry sweeper; event streams get one hub."""
    url, embedded = await asyncio.to_thread(resolve_redis_url, settings)
    redis = redis_client(url)
    blobs = make_blob_store(settings, redis)
    jobs = Jobs(redis, settings, blobs=blobs)
    limiter = RateLimiter(redis, settings.rate_limit_per_min, settings.rate_limit_burst)
    with contextlib.suppress(RedisError, OSError):
        await jobs.ensure_group()
    sweeper = asyncio.create_task(_sweep_blobs(blobs)) if isinstance(blobs, DirBlobStore) else None
    # Streams check that their job still exists once per ping interval, and end with an `error`
    # event once Redis has been unreachable for two of them.
    hub = StreamHub(redis, max_subscribers=settings.sse_max_clients, max_per_owner=settings.quota_streams,
                    retry_after_s=settings.retry_after_s,
                    idle_check_s=settings.sse_ping_s, outage_grace_s=2 * settings.sse_ping_s)
    await hub.start()
    try:
        yield GatewayState(settings, redis, jobs, blobs, limiter, hub, Ledger(redis, settings),
                           UploadSlots(settings.quota_uploads, settings.retry_after_s))
    finally:
        await hub.close()
        if sweeper is not None:
            sweeper.cancel()
        await jobs.aclose()
        await blobs.aclose()
        await redis.aclose()
        if isinstance(embedded, EmbeddedRedis):
            embedded.stop()


async def _sweep_blobs(blobs: DirBlobStore, every_s: float = 300.0) -> None:
    while True:
        with contextlib.suppress(OSError):
            removed = await asyncio.to_thread(blobs.sweep)
            if removed:
                log.info("expired blobs removed", extra={"removed": removed})
        await asyncio.sleep(every_s)


def gateway_state(request: Request) -> GatewayState:
    return request.app.state.gw


# The dependencies are `async def` although they never wait: FastAPI runs a plain `def` dependency in
# its thread pool, a thread hop per dependency per request (two for every authenticated route), and
# under load those hops queue behind every other tenant's in the shared pool and wait for the GIL.
async def state(request: Request) -> GatewayState:
    return gateway_state(request)


@dataclass
class Caller:
    key_id: str | None  # short hash of the API key (never the key itself); None when keys are off
    bucket: str  # rate-limit bucket: the key id, or the client address when keys are off

    @property
    def tenant(self) -> str | None:
        """Whose quotas a request counts against (service/quotas.py): the API key; None (no quotas)
        when keys are off."""
        return self.key_id


def key_id_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


async def authenticate(request: Request) -> Caller:
    return caller_of(request)


def caller_of(request: Request) -> Caller:
    """Optional API keys: `Authorization: Bearer KEY` or `X-API-Key: KEY`, compared in constant
    time against every configured key (no early exit that would leak which one matched)."""
    keys = gateway_state(request).settings.api_keys
    if not keys:
        host = request.client.host if request.client else "unknown"
        return Caller(None, f"ip:{host}")
    given = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization") or ""
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    challenge = {"WWW-Authenticate": "Bearer"}
    if not given:
        raise ApiError("unauthorized", "an API key is required (Authorization: Bearer KEY or X-API-Key)", challenge)
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.encode(), key.encode())
    if not matched:
        raise ApiError("unauthorized", "invalid API key", challenge)
    kid = key_id_of(given)
    return Caller(kid, kid)


async def rate_limited(request: Request, caller: Caller = Depends(authenticate)) -> Caller:
    """The caller, after taking one token from its bucket (429 + Retry-After when empty). Use it
    as the dependency of every route that creates work."""
    decision = await gateway_state(request).limiter.hit(caller.bucket)
    if not decision.allowed:
        raise ApiError("rate_limited", "too many requests for this API key", {"Retry-After": str(decision.retry_after_s)})
    return caller


async def owned_job(gw: GatewayState, job_id: str, caller: Caller) -> JobView:
    """The job, or 404 when unknown, expired, or not provably the caller's."""
    return (await owned_job_and_spec(gw, job_id, caller))[0]


async def owned_job_and_spec(gw: GatewayState, job_id: str, caller: Caller) -> tuple[JobView, JobSpec | None]:
    """The job and its spec (one Redis read), or 404 when unknown, expired, or not provably the
    caller's: with API keys on, a job whose spec cannot be read names no owner, so no key sees it."""
    if not JOB_ID.match(job_id):
        raise ApiError("job_not_found", f"no job {job_id!r}")
    bind_job(job_id)  # the rest of this request logs with the job's id
    view, spec = await gw.jobs.get_with_spec(job_id)
    if view is not None and caller.key_id is not None and (spec is None or spec.api_key_id != caller.key_id):
        view = None
    if view is None:
        raise ApiError("job_not_found", f"no job {job_id!r} (unknown or expired)")
    return view, spec
