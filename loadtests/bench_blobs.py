"""Redis blob store: one round trip per chunk (what RedisBlobStore does) vs several chunks per round trip.

Why it exists: batching chunk writes/reads looked like an obvious win and was measured slower on the
embedded Redis; this keeps the measurement reproducible (`sr3d bench blobs --out DIR`). Variants run
interleaved in one process against one embedded redis-server, so their ratio is what counts.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="directory for blobs.json + blobs.png")
    p.add_argument("--mib", type=int, default=48, help="upload size in MiB")
    p.add_argument("--batch", type=int, default=8, help="chunks per round trip in the batched variant")
    p.add_argument("--repeats", type=int, default=6)


async def _measure(url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    from service.blobs import BLOB_PREFIX, RedisBlobStore
    from service.redis_conn import redis_client

    base = redis_client(url)
    store = RedisBlobStore(base, max_bytes=(args.mib + 1) << 20, chunk_bytes=1 << 20)
    raw = store.redis  # the store's binary client
    data = os.urandom(args.mib << 20)
    chunks = [data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
    k = args.batch

    async def put_batched() -> None:
        await raw.delete("bench:batched")
        for i in range(0, len(chunks), k):
            await raw.rpush("bench:batched", *chunks[i : i + k])

    async def read_batched() -> None:
        n = await raw.llen(BLOB_PREFIX + "bench/media")
        for i in range(0, n, k):
            await raw.lrange(BLOB_PREFIX + "bench/media", i, i + k - 1)

    async def read_store() -> None:
        async with store.open_path("bench/media") as path:
            assert path.stat().st_size == len(data)

    variants = {
        "write_per_chunk": lambda: store.put("bench/media", io.BytesIO(data)),
        f"write_{k}_per_trip": put_batched,
        "read_per_chunk": read_store,
        f"read_{k}_per_trip": read_batched,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(args.repeats):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                await fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        await raw.delete("bench:batched", BLOB_PREFIX + "bench/media")
        await store.aclose()
        await base.aclose()
    return times


def run(args: argparse.Namespace) -> int:
    from loadtests.report import save_report
    from service.redis_conn import start_embedded_redis

    with tempfile.TemporaryDirectory(prefix="sr3d-bench-blobs-") as d:
        url, handle = start_embedded_redis(Path(d))
        try:
            times = asyncio.run(_measure(url, args))
        finally:
            handle.stop()
    report: dict[str, Any] = {
        "bytes": args.mib << 20, "chunk_bytes": 1 << 20, "repeats": args.repeats, "redis": "embedded, unix socket",
        "median_s": {name: round(statistics.median(v), 4) for name, v in times.items()},
        "all_s": {name: [round(x, 4) for x in v] for name, v in times.items()},
    }
    save_report(args.out, "blobs", report, _plot)
    return 0


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["median_s"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [report["median_s"][n] for n in names], color=["C0", "C1", "C0", "C1"])
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"{report['bytes'] >> 20} MiB blob, 1 MiB chunks, {report['redis']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
