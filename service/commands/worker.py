"""`sr3d worker`: the production worker. Needs REDIS_URL; serves /metrics /healthz /readyz (:9100)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from service.settings import Settings

log = logging.getLogger(__name__)


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run a worker against REDIS_URL (serves /metrics /healthz /readyz on :9100)")
    p.add_argument("--metrics-host", default=None, help="bind address of the health/metrics server (default SR3D_WORKER_METRICS_HOST, 127.0.0.1)")
    p.add_argument("--metrics-port", type=int, default=None, help="default SR3D_WORKER_METRICS_PORT (9100)")
    p.add_argument("--consumer", default=None, help="consumer name in the group (default SR3D_WORKER_NAME, else host-pid; see service.consumer_name)")
    add_drain_timeout(p)
    p.set_defaults(func=main)


def add_drain_timeout(p: argparse.ArgumentParser) -> None:
    """`--drain-timeout`, shared with `sr3d serve`; unset keeps SR3D_DRAIN_TIMEOUT_S."""
    p.add_argument("--drain-timeout", type=float, default=None,
                   help="seconds to finish in-flight jobs after SIGTERM (default SR3D_DRAIN_TIMEOUT_S, 60)")


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the command line's --drain-timeout on top."""
    settings = Settings()
    if args.drain_timeout is not None:
        settings = settings.model_copy(update={"drain_timeout_s": args.drain_timeout})
    return settings


def main(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    _setup_logging(settings)
    if not settings.redis_url:
        print(
            "sr3d worker: REDIS_URL is not set. A standalone worker must share Redis with the gateway "
            "(e.g. REDIS_URL=redis://redis:6379/0); use `sr3d serve` for the all-in-one demo.",
            file=sys.stderr,
        )
        return 2
    from service.consumer_name import consumer_name

    port = args.metrics_port if args.metrics_port is not None else settings.worker_metrics_port
    from service.lifeline import bind_children

    bind_children()  # the engine's processes (vLLM's engine core) die with us, even on SIGKILL
    host = args.metrics_host or settings.worker_metrics_host
    consumer = args.consumer or consumer_name(settings.worker_name)
    asyncio.run(run_worker(settings, host, port, consumer))
    return 0


def _setup_logging(settings: Settings) -> None:
    from service.logging import setup_logging  # structured JSON logs, as the gateway writes them

    setup_logging(settings.log_level)


async def run_worker(settings: Settings, host: str, port: int, consumer: str | None) -> None:
    import uvicorn

    from service.redis_conn import redis_client
    from service.runtime import QuietServer, build_worker, install_stop_handlers
    from service.worker_http import create_worker_app

    redis = redis_client(settings.redis_url)
    runtime = None
    stopping = asyncio.Event()
    install_stop_handlers(stopping.set)
    http = QuietServer(
        uvicorn.Config(create_worker_app(lambda: runtime is not None and runtime.ready, redis.ping), host=host, port=port, log_level="warning", lifespan="off")
    )
    http_task = asyncio.create_task(http.serve())
    try:
        build = asyncio.create_task(build_worker(settings, redis, consumer=consumer))
        stop_wait = asyncio.create_task(stopping.wait())
        await asyncio.wait([build, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        if not build.done():  # SIGTERM while loading: nothing claimed yet, just leave
            build.cancel()
            return
        runtime = build.result()
        run_task = asyncio.create_task(runtime.worker.run())
        await asyncio.wait([run_task, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        runtime.worker.stop()
        await run_task  # drains in-flight jobs
        await runtime.engine.close()
    finally:
        http.should_exit = True
        await http_task
        await redis.aclose()
