"""A production `Worker` process whose engine is the benchmark-only EchoEngine (`python -m loadtests.echo_worker`).

Everything but the model is real: Jobs on REDIS_URL, the blob store, the Pipeline (decode +
point maps, cached per upload), token coalescing, terminal event, finish, ack. `sr3d bench queue`
runs one of these to measure what the queue path itself can carry.
"""
from __future__ import annotations

import asyncio
import os
import sys


async def _main() -> None:
    from service.blobs import make_blob_store
    from service.engines.echo import EchoEngine
    from service.pipeline import Pipeline, make_pointmap_backend
    from service.jobs import Jobs
    from service.redis_conn import redis_client
    from service.runtime import install_stop_handlers
    from service.settings import Settings
    from service.worker import Worker, WorkerConfig

    settings = Settings()
    if not settings.redis_url:
        raise SystemExit("REDIS_URL is required")
    redis = redis_client(settings.redis_url)
    engine = EchoEngine(float(os.environ.get("SR3D_ECHO_TOKEN_DELAY_S", "0")),
                        float(os.environ.get("SR3D_ECHO_FIRST_TOKEN_DELAY_S", "0")))
    await engine.start()
    backend = await asyncio.to_thread(make_pointmap_backend, settings)
    pipeline = Pipeline(settings, make_blob_store(settings, redis), backend)
    worker = Worker(Jobs(redis, settings), engine, pipeline, WorkerConfig.from_settings(settings))
    install_stop_handlers(worker.stop)
    print("echo worker: running", flush=True)
    try:
        await worker.run()
    finally:
        await engine.close()
        await redis.aclose()


def main() -> int:
    asyncio.run(_main())
    return 0


if __name__ == "__main__":
    sys.exit(main())
