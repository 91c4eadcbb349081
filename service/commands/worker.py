"""`sr3d worker`: the production worker. Needs REDIS_URL; serves /metrics /healthz /readyz on its metrics
port (SR3D_WORKER_METRICS_PORT; unset = 9100 + its GPU index, see service.worker_startup).

Start-up order (issue 31): configuration and paths, metrics socket bound, Redis answering, registration
written, and only then the model load. Anything that fails before the load ends the process with one
stderr line and an exit code from service.worker_startup, in about a second.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from typing import Any, TypeVar

from service.commands.config import settings_or_exit
from service.settings import WorkerSettings
from service.worker_startup import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_REDIS, REDIS_PING_TIMEOUT_S, StartupError

log = logging.getLogger(__name__)
W = TypeVar("W", bound=WorkerSettings)


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run a worker against REDIS_URL (serves /metrics /healthz /readyz on 9100 + its GPU index)")
    p.add_argument("--metrics-host", default=None, help="bind address of the health/metrics server (default SR3D_WORKER_METRICS_HOST, 127.0.0.1)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="default SR3D_WORKER_METRICS_PORT; unset: 9100 + the first GPU index in CUDA_VISIBLE_DEVICES (9100 without one); 0 = any free port")
    p.add_argument("--consumer", default=None, help="consumer name in the group (default SR3D_WORKER_NAME, else host-pid; see service.consumer_name)")
    add_drain_timeout(p)
    p.set_defaults(func=main)


def add_drain_timeout(p: argparse.ArgumentParser) -> None:
    """`--drain-timeout`, shared with `sr3d serve`; unset keeps SR3D_DRAIN_TIMEOUT_S."""
    p.add_argument("--drain-timeout", type=float, default=None,
                   help="seconds to finish in-flight jobs after SIGTERM (default SR3D_DRAIN_TIMEOUT_S, 60)")


def settings_from(args: argparse.Namespace, role: type[W], command: str) -> W:
    """The role's settings from the environment (exit 2 naming a refused variable), with the command
    line's --drain-timeout on top."""
    settings = settings_or_exit(role, command)
    if args.drain_timeout is not None:
        settings = settings.model_copy(update={"drain_timeout_s": args.drain_timeout})
    return settings


def main(args: argparse.Namespace) -> int:
    from service.worker_startup import bind_metrics_socket, check_paths, choose_metrics_port

    settings = settings_from(args, WorkerSettings, "worker")  # gateway-only variables are not read
    _setup_logging(settings)
    if not settings.redis_url:
        print(
            "sr3d worker: REDIS_URL is not set. A standalone worker must share Redis with the gateway "
            "(e.g. REDIS_URL=redis://redis:6379/0); use `sr3d serve` for the all-in-one demo.",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    from service.consumer_name import consumer_name

    host = args.metrics_host or settings.worker_metrics_host
    choice = choose_metrics_port(args.metrics_port if args.metrics_port is not None else settings.worker_metrics_port,
                                 settings.cuda_visible_devices)
    try:
        check_paths(settings)
        sock = bind_metrics_socket(host, choice)  # claimed now, served later: nobody can take it meanwhile
    except StartupError as e:
        print(e.line, file=sys.stderr)
        return e.code
    port = int(sock.getsockname()[1])
    log.info("worker metrics server bound", extra={"metrics_host": host, "metrics_port": port, "port_rule": choice.rule})
    from service.lifeline import bind_children

    bind_children()  # the engine's processes (vLLM's engine core) die with us, even on SIGKILL
    consumer = args.consumer or consumer_name(settings.worker_name)
    return asyncio.run(run_worker(settings, sock, consumer, choice.rule))


def _setup_logging(settings: WorkerSettings) -> None:
    from service.logging import setup_logging  # structured JSON logs, as the gateway writes them

    setup_logging(settings.log_level)


async def _redis_answers(redis: Any) -> str | None:
    """None once Redis answers a PING; why not, when it has not within REDIS_PING_TIMEOUT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REDIS_PING_TIMEOUT_S
    why = "no answer"
    while (left := deadline - loop.time()) > 0:
        try:
            await asyncio.wait_for(redis.ping(), left)
            return None
        except asyncio.TimeoutError:
            break  # our own deadline: keep the last real error, if any
        except Exception as e:  # noqa: BLE001 - refused, auth, ...: all the same precondition failing
            why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        await asyncio.sleep(min(0.5, max(0.0, deadline - loop.time())))  # a Redis starting alongside us
    return why


async def run_worker(settings: WorkerSettings, sock: socket.socket, consumer: str, port_rule: str) -> int:
    from service.redis_conn import redis_client

    redis = redis_client(settings.redis_url or "")
    try:
        why = await _redis_answers(redis)
        if why is not None:
            print(f"sr3d worker: Redis at REDIS_URL did not answer PING within {REDIS_PING_TIMEOUT_S:.0f} s ({why}); "
                  f"exiting with code {EXIT_REDIS} before loading the model.", file=sys.stderr)
            sock.close()
            return EXIT_REDIS
        import uvicorn  # the heavy imports (torch, the engine) only once the cheap checks passed

        from service.heap import freeze_startup_heap
        from service.runtime import QuietServer, build_worker, install_stop_handlers
        from service.worker_http import create_worker_app
        from service.worker_registry import keep_registered, registration, unregister

        bound_host, port = str(sock.getsockname()[0]), int(sock.getsockname()[1])
        runtime = None
        stopping = asyncio.Event()
        install_stop_handlers(stopping.set)
        app = create_worker_app(lambda: runtime is not None and runtime.ready, redis.ping)
        http = QuietServer(uvicorn.Config(app, host=bound_host, port=port, log_level="warning", lifespan="off"))
        http_task = asyncio.create_task(http.serve(sockets=[sock]), name="sr3d-worker-http")
        fields = registration(consumer, bound_host, port, port_rule, settings.cuda_visible_devices)
        reg_task = asyncio.create_task(
            keep_registered(redis, fields, lambda: "ready" if runtime is not None and runtime.ready else "loading",
                            period_s=max(0.2, min(settings.heartbeat_s, 10.0))),
            name="sr3d-worker-registration")
        stop_wait = asyncio.create_task(stopping.wait())
        try:
            build = asyncio.create_task(build_worker(settings, redis, consumer=consumer))
            # The HTTP task is watched too: if it ends on its own the worker must not go on unobserved.
            await asyncio.wait([build, stop_wait, http_task], return_when=asyncio.FIRST_COMPLETED)
            if http_task.done():
                build.cancel()
                return _http_died(http_task)
            if not build.done():  # SIGTERM while loading: nothing claimed yet, just leave
                build.cancel()
                return EXIT_OK
            runtime = build.result()
            freeze_startup_heap()  # the engine is loaded: its objects need no more collecting
            run_task = asyncio.create_task(runtime.worker.run())
            await asyncio.wait([run_task, stop_wait, http_task], return_when=asyncio.FIRST_COMPLETED)
            runtime.worker.stop()
            await run_task  # drains in-flight jobs
            await runtime.engine.close()
            return _http_died(http_task) if http_task.done() else EXIT_OK
        finally:
            stop_wait.cancel()
            reg_task.cancel()
            await asyncio.gather(reg_task, return_exceptions=True)
            await unregister(redis, consumer)
            http.should_exit = True
            await asyncio.gather(http_task, return_exceptions=True)
    finally:
        await redis.aclose()


def _http_died(http_task: asyncio.Task[None]) -> int:
    exc = http_task.exception() if not http_task.cancelled() else None
    log.error("the worker's metrics/health server stopped on its own; exiting", exc_info=exc)
    return EXIT_FAILED
