"""Soak: steady load for a long time, then check that nothing grows without bound.

`sr3d bench service --soak --duration 600 [--concurrency 2] [--soak-ttl 20] [--out DIR]` starts its
own stack as separate processes (redis-server, `sr3d gateway`, `sr3d worker`, so that each one's
RSS is its own) with a short job TTL, warms it up, samples RSS every few seconds under load, then
waits out the TTL and counts Redis keys by family. Per-job keys (job hash, events stream, blobs)
must all have expired: anything left is a leak. RSS is reported as growth after warm-up and as the
slope over the second half of the run (a leak keeps climbing; a cache levels off).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from loadtests import report as rpt
from loadtests.load import closed_loop
from loadtests.scenarios import LoadConfig, parse_mix
from service.local_stack import Stack, rss_bytes

PER_JOB_FAMILIES = ("job", "blob")  # sr3d:job:{id}, sr3d:job:{id}:events, sr3d:blob:{key}...


def key_families(redis_url: str) -> dict[str, int]:
    """Count keys by family: sr3d:job:{id} -> "job", sr3d:job:{id}:events -> "job_events", ..."""
    import redis

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        counts: Counter[str] = Counter()
        for key in r.scan_iter(match="*", count=1000):
            parts = key.split(":")
            if parts[0] != "sr3d":
                counts["other"] += 1
            elif parts[1] == "job" and parts[-1] == "events":
                counts["job_events"] += 1
            elif len(parts) > 2:
                counts[parts[1]] += 1
            else:
                counts[key] += 1  # sr3d:jobs, sr3d:dlq: one key each
        return dict(sorted(counts.items()))
    finally:
        r.close()


class RssSampler(threading.Thread):
    """Samples RSS of named pids every `period` s into `series` {name: [(t, bytes), ...]}."""

    def __init__(self, pids: dict[str, int], period: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.pids, self.period = pids, period
        self.series: dict[str, list[tuple[float, int]]] = {n: [] for n in pids}
        self._halt = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> None:
        t = time.monotonic() - self.t0
        for name, pid in self.pids.items():
            v = rss_bytes(pid)
            if v is not None:
                self.series[name].append((round(t, 2), v))

    def run(self) -> None:
        while not self._halt.wait(self.period):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


def _slope_mb_per_min(points: list[tuple[float, int]]) -> float | None:
    """Least-squares slope over the second half of the run."""
    half = points[len(points) // 2:]
    if len(half) < 3:
        return None
    n = len(half)
    mx = sum(t for t, _ in half) / n
    my = sum(v for _, v in half) / n
    var = sum((t - mx) ** 2 for t, _ in half)
    if var == 0:
        return None
    slope = sum((t - mx) * (v - my) for t, v in half) / var  # bytes per second
    return round(slope * 60 / 2**20, 3)


def run(args: argparse.Namespace) -> int:
    if args.url:
        print("--soak starts and measures its own processes; drop --url", file=sys.stderr)
        return 2
    users = int((args.concurrency or "2").split(",")[0])
    cfg = LoadConfig(max_tokens=args.max_tokens, num_frames=args.num_frames)
    ttl = int(args.soak_ttl)
    env = {"SR3D_JOB_TTL_S": str(ttl), "SR3D_WORKER_CONCURRENCY": str(max(2, users))}
    with tempfile.TemporaryDirectory(prefix="sr3d-soak-") as tmp, Stack(Path(tmp), env) as st:
        redis = st.start_redis()
        gw, url = st.start_gateway()
        wk, wurl = st.start_worker()
        st.wait_ready(url, gw)
        st.wait_ready(wurl, wk, timeout=300)
        # warm-up: lazy imports, caches, allocator pools settle before the baseline
        asyncio.run(closed_loop(url, users, min(20.0, args.duration / 10), parse_mix(args.mix), cfg, args.seed + 1))
        keys_before = key_families(st.redis_url)
        sampler = RssSampler({"gateway": gw.pid, "worker": wk.pid, "redis": redis.pid}, period=max(1.0, args.duration / 120))
        sampler.sample()
        sampler.start()
        outcomes, wall = asyncio.run(closed_loop(url, users, args.duration, parse_mix(args.mix), cfg, args.seed))
        sampler.stop()
        keys_end = key_families(st.redis_url)
        time.sleep(ttl + 3)  # every job is terminal now; let its TTL pass
        keys_after = key_families(st.redis_url)
        alive = {"gateway": gw.alive(), "worker": wk.alive(), "redis": redis.alive()}
    load = rpt.summarize(outcomes, wall, rpt.SLO(args.slo_ttft, args.slo_itl, args.slo_e2e), f"soak users={users}")
    rss: dict[str, Any] = {}
    for name, pts in sampler.series.items():
        if pts:
            rss[name] = {"start_mb": round(pts[0][1] / 2**20, 2), "end_mb": round(pts[-1][1] / 2**20, 2),
                         "max_mb": round(max(v for _, v in pts) / 2**20, 2),
                         "growth_mb": round((pts[-1][1] - pts[0][1]) / 2**20, 2),
                         "slope_second_half_mb_per_min": _slope_mb_per_min(pts)}
    leaked = {f: keys_after.get(f, 0) for f in ("job", "job_events", "blob") if keys_after.get(f, 0)}
    result = {"config": {"title": "sr3d soak", "duration_s": args.duration, "users": users, "job_ttl_s": ttl,
                         "max_tokens": cfg.max_tokens, "num_frames": cfg.num_frames},
              "load": load, "rss": rss, "redis_keys": {"before": keys_before, "end_of_load": keys_end,
                                                       "after_ttl": keys_after},
              "per_job_keys_left_after_ttl": leaked, "processes_alive_at_end": alive,
              "verdict": "ok" if not leaked and all(alive.values()) else "leak-or-crash"}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
        _plot(sampler.series, out / "soak.png", result)
        result["files"] = [str(out / "soak.json"), str(out / "soak.png")]
    print(json.dumps(result, indent=2))
    return 0 if result["verdict"] == "ok" else 1


def _plot(series: dict[str, list[tuple[float, int]]], path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, pts in series.items():
        if pts:
            ax.plot([t for t, _ in pts], [v / 2**20 for _, v in pts], label=name)
    ax.set(xlabel="s since baseline", ylabel="RSS (MiB)",
           title=f"soak: {result['load']['requests']} requests, keys left after TTL: {result['per_job_keys_left_after_ttl'] or 'none'}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

