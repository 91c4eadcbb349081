"""The standalone worker's own HTTP surface (its metrics port: 9100 + GPU index by default, see
service.worker_startup): /metrics, /healthz, /readyz. It serves on a socket bound before the model loads.

Kept apart from the gateway: a worker pod is probed and scraped on its own, and `/readyz` here
means "model loaded, warm-up generation passed, Redis reachable" — the condition for KEDA/k8s to
count it as capacity.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def create_worker_app(is_ready: Callable[[], bool], redis_ping: Callable[[], Awaitable[object]]) -> Starlette:
    async def metrics(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        if not is_ready():
            return JSONResponse({"status": "starting", "reason": "model not loaded or warm-up not passed"}, status_code=503)
        try:
            await redis_ping()
        except Exception as e:  # noqa: BLE001 - any Redis failure means not ready
            return JSONResponse({"status": "unavailable", "reason": f"redis: {type(e).__name__}"}, status_code=503)
        return JSONResponse({"status": "ready"})

    return Starlette(routes=[Route("/metrics", metrics), Route("/healthz", healthz), Route("/readyz", readyz)])
