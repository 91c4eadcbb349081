"""Queue path benchmark: gateway overhead vs the engine in-process, and raw queue throughput.

`sr3d bench queue [--jobs 100] [--concurrency 1,8] [--overhead-jobs 5] [--out DIR]`, one run, two parts:

1. overhead: the same job (real clip, 1 box, tiny model unless SR3D_MODEL) run alternately
   (a) in this process: Pipeline.build + engine.generate, nothing else, and
   (b) through the production path: HTTP upload -> `sr3d gateway` -> Redis stream -> `sr3d worker`
       -> events stream -> SSE back to the client.
   Reported as e2e and TTFT ratios (b)/(a) and the absolute difference: what the service costs per job.
2. throughput: a worker process whose engine is EchoEngine (loadtests/echo_worker.py; every other
   part is production code) drains N jobs submitted over HTTP by concurrent clients; jobs/s
   submitted and completed for each worker concurrency, and ratios against the first.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from loadtests.scenarios import VIDEO, video_media
from service.client import JobRequest, Media, SR3DClient
from service.local_stack import Stack

QUESTION = "How far is <region0> from the camera?"
BOX = [250.0, 120.0, 330.0, 300.0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=100, help="jobs per throughput configuration (default 100)")
    p.add_argument("--submitters", type=int, default=16, help="concurrent HTTP submitters (default 16)")
    p.add_argument("--concurrency", default="1,8", help="echo-worker concurrency levels (default 1,8)")
    p.add_argument("--overhead-jobs", type=int, default=5, help="jobs per path in the overhead comparison (default 5)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--num-frames", type=int, default=4)
    p.add_argument("--skip-overhead", action="store_true", help="only the echo-engine throughput part")
    p.add_argument("--out", help="directory for queue.json + queue.png")


def tiny_png(side: int = 64) -> bytes:
    from PIL import Image

    from loadtests.scenarios import IMAGE_SRC, fixture

    with Image.open(fixture(IMAGE_SRC)) as im:
        buf = io.BytesIO()
        im.convert("RGB").resize((side, side)).save(buf, format="PNG")
    return buf.getvalue()


# --- part 1: overhead --------------------------------------------------------------------------
async def _direct_once(settings: Any, pipeline: Any, engine: Any, media_key: str, media: bytes, max_tokens: int,
                       num_frames: int) -> dict[str, float]:
    from model.inputs import GenerationParams
    from service.engines.protocol import EngineRequest
    from service.schemas import BoxRegion, GenerationOptions, JobSpec

    jid = uuid.uuid4().hex
    job = JobSpec(job_id=jid, media_kind="video", media_blob=media_key, media_hash=hashlib.sha256(media).hexdigest(),
                  media_filename=VIDEO.name, question=QUESTION, regions=[[BoxRegion(frame=0, box=BOX)]],
                  options=GenerationOptions(max_tokens=max_tokens, num_frames=num_frames), created_at=time.time())

    async def on_stage(stage: str, info: dict[str, Any]) -> None:
        return None

    t0 = time.perf_counter()
    query = await pipeline.build(job, on_stage)
    first = None
    n = 0
    async for d in engine.generate(EngineRequest(jid, query, GenerationParams(max_tokens=max_tokens, temperature=0.0))):
        if first is None and d.text:
            first = time.perf_counter()
        n = d.completion_tokens or n
    end = time.perf_counter()
    return {"e2e_s": end - t0, "ttft_s": (first or end) - t0, "tokens": n}


async def _full_once(url: str, max_tokens: int, num_frames: int) -> dict[str, float]:
    req = JobRequest(video_media(), QUESTION, [[{"frame": 0, "box": BOX}]],
                     options={"max_tokens": max_tokens, "num_frames": num_frames, "temperature": 0.0})
    async with SR3DClient(url) as c:
        res = await c.run(req)
    if not res.ok:
        raise RuntimeError(f"full-path job failed: {res.error_body or res.terminal or res.client_error}")
    return {"e2e_s": res.e2e or 0.0, "ttft_s": res.ttft or 0.0, "tokens": res.completion_tokens}


async def overhead(url: str, n: int, max_tokens: int, num_frames: int) -> dict[str, Any]:
    from service.blobs import make_blob_store
    from service.engines import make_engine
    from service.pipeline import Pipeline, make_pointmap_backend
    from service.redis_conn import redis_client
    from service.settings import Settings

    settings = Settings()
    redis = redis_client(settings.redis_url)
    blobs = make_blob_store(settings, redis)
    media = VIDEO.read_bytes()
    media_key = f"bench-direct-{uuid.uuid4().hex}"
    await blobs.put(media_key, media, ttl_s=3600)
    engine = make_engine(settings)
    await engine.start()
    pipeline = Pipeline(settings, blobs, await asyncio.to_thread(make_pointmap_backend, settings))
    try:
        # warm both paths (point-map caches, lazy imports), then alternate so drift hits both equally
        await _direct_once(settings, pipeline, engine, media_key, media, max_tokens, num_frames)
        await _full_once(url, max_tokens, num_frames)
        direct, full = [], []
        for _ in range(n):
            direct.append(await _direct_once(settings, pipeline, engine, media_key, media, max_tokens, num_frames))
            full.append(await _full_once(url, max_tokens, num_frames))
    finally:
        await engine.close()
        await blobs.delete(media_key)
        await redis.aclose()

    def med(rows: list[dict[str, float]], k: str) -> float:
        return statistics.median(r[k] for r in rows)

    d_e2e, f_e2e, d_ttft, f_ttft = med(direct, "e2e_s"), med(full, "e2e_s"), med(direct, "ttft_s"), med(full, "ttft_s")
    return {"jobs_per_path": n, "max_tokens": max_tokens, "num_frames": num_frames,
            "direct": {"e2e_s_median": round(d_e2e, 4), "ttft_s_median": round(d_ttft, 4),
                       "tokens": [r["tokens"] for r in direct]},
            "full_path": {"e2e_s_median": round(f_e2e, 4), "ttft_s_median": round(f_ttft, 4),
                          "tokens": [r["tokens"] for r in full]},
            "e2e_ratio_full_over_direct": round(f_e2e / d_e2e, 3),
            "ttft_ratio_full_over_direct": round(f_ttft / d_ttft, 3),
            "overhead_ms_per_job": round((f_e2e - d_e2e) * 1000, 1)}


# --- part 2: throughput ------------------------------------------------------------------------
async def throughput(url: str, n_jobs: int, submitters: int, max_tokens: int) -> dict[str, Any]:
    from service.jobs import Jobs
    from service.redis_conn import redis_client
    from service.settings import Settings

    settings = Settings()
    redis = redis_client(settings.redis_url)
    queue = Jobs(redis, settings)
    media = Media("image", "tiny.png", tiny_png(), "image/png")
    req = JobRequest(media, QUESTION, [[{"frame": 0, "box": [8.0, 8.0, 40.0, 40.0]}]], options={"max_tokens": max_tokens})
    ids: list[str] = []
    statuses: dict[int, int] = {}
    try:
        async with SR3DClient(url) as c:
            # warm-up: the echo worker is up and its point-map cache holds the tiny image
            warm = await c.run(req)
            if not warm.ok:
                raise RuntimeError(f"warm-up job failed: {warm.terminal or warm.error_body or warm.client_error}")
            todo = iter(range(n_jobs))
            t0 = time.perf_counter()

            async def submitter() -> None:
                for _ in todo:
                    r = await c.submit(req)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code == 202:
                        ids.append(r.json()["job_id"])

            await asyncio.gather(*(submitter() for _ in range(submitters)))
            t_submitted = time.perf_counter()
        while True:  # the worker acks only after the terminal event: lag 0 + pending 0 == all answered
            s = await queue.stats()
            if s["lag"] == 0 and s["pending"] == 0:
                break
            if time.perf_counter() - t0 > 600:
                raise TimeoutError(f"queue not drained after 600 s: {s}")
            await asyncio.sleep(0.01)
        t_done = time.perf_counter()
        views = await asyncio.gather(*(queue.get(j) for j in ids))
        done = sum(1 for v in views if v is not None and v.status.value == "done")
    finally:
        await redis.aclose()
    return {"jobs": n_jobs, "accepted": len(ids), "done": done, "http_statuses": {str(k): v for k, v in statuses.items()},
            "submit_s": round(t_submitted - t0, 3), "drain_s": round(t_done - t0, 3),
            "submitted_per_s": round(len(ids) / (t_submitted - t0), 2), "completed_per_s": round(done / (t_done - t0), 2)}


def run(args: argparse.Namespace) -> int:
    levels = [int(x) for x in args.concurrency.split(",")]
    out: dict[str, Any] = {"config": {"jobs": args.jobs, "submitters": args.submitters, "concurrency": levels,
                                      "max_tokens": args.max_tokens, "num_frames": args.num_frames}}
    with tempfile.TemporaryDirectory(prefix="sr3d-bench-queue-") as tmp:
        data = os.environ.get("SR3D_DATA_DIR", str(Path(tmp) / "data"))
        with Stack(Path(tmp), {"SR3D_DATA_DIR": data, "SR3D_QUEUE_MAX": str(max(256, args.jobs * 2))}) as st:
            st.start_redis()
            os.environ.update({"REDIS_URL": st.redis_url, "SR3D_DATA_DIR": data})  # this process's Settings()
            gw, url = st.start_gateway()
            st.wait_ready(url, gw)
            if not args.skip_overhead:
                wk, wurl = st.start_worker()
                st.wait_ready(wurl, wk, timeout=300)
                out["overhead"] = asyncio.run(overhead(url, args.overhead_jobs, args.max_tokens, args.num_frames))
                print(json.dumps({"overhead": out["overhead"]}), file=sys.stderr)
                st.stop(wk, signal.SIGTERM)
            out["throughput"] = []
            for c in levels:
                echo = st.start_module("echo-worker", "loadtests.echo_worker", {"SR3D_WORKER_CONCURRENCY": str(c)})
                row = asyncio.run(throughput(url, args.jobs, args.submitters, args.max_tokens))
                row["worker_concurrency"] = c
                out["throughput"].append(row)
                print(json.dumps(row), file=sys.stderr)
                st.stop(echo, signal.SIGTERM)
    base = out["throughput"][0]["completed_per_s"] if out["throughput"] else None
    out["throughput_ratios"] = [{"label": f"concurrency {r['worker_concurrency']} vs {levels[0]}",
                                 "completed_per_s": round(r["completed_per_s"] / base, 3) if base else None}
                                for r in out["throughput"][1:]]
    if args.out:
        d = Path(args.out)
        d.mkdir(parents=True, exist_ok=True)
        (d / "queue.json").write_text(json.dumps(out, indent=2) + "\n")
        _plot(out, d / "queue.png")
        out["files"] = [str(d / "queue.json"), str(d / "queue.png")]
    print(json.dumps(out, indent=2))
    return 0


def _plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    if "overhead" in out:
        o = out["overhead"]
        a.bar(["direct e2e", "full e2e", "direct TTFT", "full TTFT"],
              [o["direct"]["e2e_s_median"], o["full_path"]["e2e_s_median"], o["direct"]["ttft_s_median"], o["full_path"]["ttft_s_median"]],
              color=["tab:blue", "tab:orange", "tab:blue", "tab:orange"])
        a.set(title=f"gateway+Redis+worker vs in-process (x{o['e2e_ratio_full_over_direct']} e2e)", ylabel="s (median)")
    rows = out["throughput"]
    xs = [str(r["worker_concurrency"]) for r in rows]
    b.bar([i - 0.2 for i in range(len(rows))], [r["submitted_per_s"] for r in rows], width=0.4, label="submitted/s")
    b.bar([i + 0.2 for i in range(len(rows))], [r["completed_per_s"] for r in rows], width=0.4, label="completed/s")
    b.set_xticks(range(len(rows)), xs)
    b.set(title="echo-engine queue throughput", xlabel="worker concurrency", ylabel="jobs/s")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
