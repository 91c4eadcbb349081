"""Measurement cost: `model.measure.measure_scene` per job on one CPU core (issue 25's budget: 50 ms for
32 frames of 640x480 and 2 regions).

The scene is a room corner seen by a camera 1.2 m above the floor that pans across --frames frames:
per-pixel rays hit the floor (y = 1.2) or the back wall (z = 4), exact depth, so every pixel is valid
(the worst case for point gathering). Configurations, timed in the same run: 2 regions each on one
frame (the common request), 2 regions each drawn on 8 frames (one object seen from several views),
and 8 regions on one frame each (28 pairs). The report gives the median and p95 per job; the PNG a bar
per configuration with the budget line. The process is pinned to one core while it times (Linux
sched_setaffinity), so the number is one core's whatever threads numpy would start.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.report import save_report

BUDGET_MS = 50.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="directory for measure.json + measure.png")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", default="640x480", help="WxH of the point maps")
    p.add_argument("--repeats", type=int, default=20, help="timed jobs per configuration (after one warm-up)")


def room(frames: int, w: int, h: int) -> Any:
    """PointMaps of a panning camera in a room corner (metres, metric, frame 0 = world)."""
    from model.geometry.types import PointMaps

    f = 0.9 * w
    K = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]], np.float32)
    u, v = np.meshgrid(np.arange(w, dtype=np.float32) + 0.5, np.arange(h, dtype=np.float32) + 0.5)
    rays_cam = np.stack([(u - w / 2) / f, (v - h / 2) / f, np.ones_like(u)], -1)
    points = np.empty((frames, h, w, 3), np.float32)
    poses = np.tile(np.eye(4, dtype=np.float32), (frames, 1, 1))
    for i in range(frames):
        yaw = np.deg2rad(-15 + 30 * i / max(1, frames - 1))  # pan 30 degrees over the clip
        R = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]], np.float32)
        rays = rays_cam @ R.T
        with np.errstate(divide="ignore", invalid="ignore"):
            t_floor = np.where(rays[..., 1] > 1e-6, 1.2 / rays[..., 1], np.inf)
            t_wall = np.where(rays[..., 2] > 1e-6, 4.0 / rays[..., 2], np.inf)
        points[i] = rays * np.minimum(t_floor, t_wall)[..., None]
        poses[i, :3, :3] = R
    return PointMaps(points=points, valid=np.ones((frames, h, w), bool), intrinsics=np.tile(K, (frames, 1, 1)),
                     poses=poses, scale=1.0, metric=True, source="rgbd")


def regions(frames: int, w: int, h: int, count: int, views: int) -> list[list[Any]]:
    from model.inputs import RegionMask

    out = []
    for k in range(count):
        x0 = int(w * (0.05 + 0.9 * k / max(1, count)))
        mask = np.zeros((h, w), bool)
        mask[int(h * 0.55):int(h * 0.9), x0:x0 + w // 10] = True  # on the floor, in front of the wall
        out.append([RegionMask(frame=(k + j * frames // views) % frames, mask=mask) for j in range(views)])
    return out


def run(args: argparse.Namespace) -> int:
    import os

    from model.measure import measure_scene

    w, h = (int(x) for x in args.size.lower().split("x"))
    pm = room(args.frames, w, h)
    configs = {"2 regions, 1 frame each": (2, 1), "2 regions, 8 frames each": (2, 8), "8 regions, 1 frame each": (8, 1)}
    rows: dict[str, Any] = {}
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        for name, (count, views) in configs.items():
            regs = regions(args.frames, w, h, count, min(views, args.frames))
            measure_scene(pm, regs)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                m = measure_scene(pm, regs)
                times.append((time.perf_counter() - t0) * 1000)
            rows[name] = {"regions": count, "frames_per_region": views, "p50_ms": round(statistics.median(times), 2),
                          "p95_ms": round(float(np.percentile(times, 95)), 2), "mean_ms": round(statistics.fmean(times), 2),
                          "available": sum(r.available for r in m.regions), "pairs": len(m.pairs)}
    finally:
        os.sched_setaffinity(0, cores)
    report = {"bench": "measure", "frames": args.frames, "size": [w, h], "repeats": args.repeats, "cores": 1,
              "budget_ms": BUDGET_MS, "configs": rows,
              "within_budget": rows["2 regions, 1 frame each"]["p50_ms"] <= BUDGET_MS}
    save_report(args.out, "measure", report, plot)
    return 0


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["configs"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    p50 = [report["configs"][n]["p50_ms"] for n in names]
    p95 = [report["configs"][n]["p95_ms"] for n in names]
    ax.barh(names, p95, color="#c6dbef", label="p95")
    ax.barh(names, p50, color="#2171b5", label="median")
    ax.axvline(report["budget_ms"], color="#cb181d", linestyle="--", label=f"budget {report['budget_ms']:g} ms")
    ax.set_xlabel(f"ms per job, one core ({report['frames']} frames {report['size'][0]}x{report['size'][1]})")
    ax.set_title("measure_scene cost per job")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
