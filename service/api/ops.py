"""Operations routes: liveness, readiness (Redis reachable) and Prometheus metrics."""
from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from service.api.deps import GatewayState, state
from service.errors import ApiError
from service.schemas import ErrorBody

router = APIRouter(tags=["ops"])


@router.get("/healthz", summary="Liveness: the process serves HTTP")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: Redis reachable", responses={503: {"model": ErrorBody}})
async def readyz(gw: GatewayState = Depends(state)) -> dict[str, str]:
    try:
        await asyncio.wait_for(gw.redis.ping(), timeout=2)
    except (RedisError, OSError, asyncio.TimeoutError):
        raise ApiError("redis_unavailable", "Redis is not reachable", {"Retry-After": str(gw.settings.retry_after_s)}) from None
    return {"status": "ready"}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics_endpoint(gw: GatewayState = Depends(state)) -> Response:
    with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
        await asyncio.wait_for(gw.jobs.stats(), timeout=2)  # fresh queue gauges on every scrape
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
