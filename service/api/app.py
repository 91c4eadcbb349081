"""The gateway's ASGI app: wiring only (state, routers, error handlers, middleware)."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.api import errors, jobs, openai, ops, page, scene
from service.api.deps import open_state
from service.api.middleware import BodySizeLimit, CloseAfterUnreadBody, KeyGate, PaceBodies, RequestMetrics
from service.settings import GatewaySettings


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway. Redis: REDIS_URL, else the embedded server under SR3D_DATA_DIR."""
    settings = settings or GatewaySettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_state(settings) as gw:
            app.state.gw = gw
            yield

    app = FastAPI(
        title="SR-3D spatial QA",
        version="0.1.0",
        description="Ask spatial questions about regions of a video or an image; answers stream back as SSE.",
        lifespan=lifespan,
        # /docs is served by the page router from local Swagger UI files (the defaults load them
        # from a CDN and render blank offline); ReDoc loaded from a CDN too, and one reference page is enough.
        docs_url=None,
        redoc_url=None,
        openapi_tags=[{"name": "spatial-qa", "description": "jobs: submit, status, events, cancel"},
                      {"name": "openai", "description": "OpenAI-compatible: models, chat completions, files"},
                      {"name": "ops", "description": "health, readiness, metrics"}],
    )
    errors.install(app, settings)
    app.include_router(jobs.router)
    app.include_router(openai.router)
    app.include_router(ops.router)
    app.include_router(scene.router)
    app.include_router(page.router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=False,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "Idempotency-Key", "Last-Event-ID", "Accept"],
            expose_headers=["Location", "Retry-After", "Idempotent-Replayed", "X-SR3D-Job-Id"],
        )
    # Body cap: multipart overhead on top of the media cap (masks, fields, boundaries).
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + 1024 * 1024)
    app.add_middleware(PaceBodies, mib_per_s=settings.quota_upload_mib_s)
    app.add_middleware(CloseAfterUnreadBody)  # outside the cap: its own 413s close too
    app.add_middleware(KeyGate, settings=settings)  # /metrics and the API reference with keys on (middleware.py)
    app.add_middleware(RequestMetrics)
    return app
