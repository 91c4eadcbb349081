"""Wiring shared by `sr3d serve` and `sr3d worker`: engine + pipeline + jobs -> Worker, and the
uvicorn server variant that leaves signal handling to us (one SIGTERM path drains the worker first).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import uvicorn

from service.engines import make_engine
from service.engines.protocol import Engine
from service.settings import Settings
from service.worker import Worker, WorkerConfig

log = logging.getLogger(__name__)


class QuietServer(uvicorn.Server):
    """uvicorn.Server without its own signal handlers: the command owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def install_stop_handlers(on_stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop)


@dataclass
class WorkerRuntime:
    worker: Worker
    engine: Engine

    @property
    def ready(self) -> bool:
        return self.worker.ready and bool(getattr(self.engine, "ready", False))


async def build_worker(settings: Settings, redis: Any, *, consumer: str | None = None) -> WorkerRuntime:
    """Load the engine (weights + warm-up) and the point-map backend, then return a ready-to-run Worker."""
    from service.blobs import make_blob_store
    from service.pipeline import Pipeline, make_pointmap_backend
    from service.jobs import Jobs

    engine = make_engine(settings)
    backend_task = asyncio.create_task(asyncio.to_thread(make_pointmap_backend, settings))
    await engine.start()
    backend = await backend_task
    blobs = make_blob_store(settings, redis)
    pipeline = Pipeline(settings, blobs, backend)
    worker = Worker(Jobs(redis, settings, blobs), engine, pipeline, WorkerConfig.from_settings(settings), consumer=consumer)
    return WorkerRuntime(worker, engine)


def banner_if_demo(settings: Settings) -> None:
    missing = [name for name, value in (("SR3D_MODEL", settings.model), ("SR3D_DEPTH_MODEL", settings.depth_model),
                                        ("SR3D_MULTIVIEW_MODEL", settings.multiview_model)) if not value]
    if missing and settings.engine == "torch":
        line = "!" * 78
        log.warning(
            "\n%s\n!! DEMO MODE: %s unset -> tiny RANDOM-weight models.\n!! The service works end to end, "
            "but its ANSWERS ARE NOT MEANINGFUL (random weights).\n!! Set SR3D_MODEL (NVILA-layout SR-3D checkpoint) and "
            "SR3D_DEPTH_MODEL (Depth Anything V2) + SR3D_MULTIVIEW_MODEL (Depth Anything 3) for real answers.\n%s",
            line,
            " and ".join(missing),
            line,
        )
