"""The ceiling of one gateway and one Redis: an open-loop ramp of uploads + SSE streams through them.

`sr3d bench ceiling [--rates 2,4,8,16] [--duration S] [--upload-mb 20] [--blob-stores redis,dir]
                    [--workers N] [--worker-concurrency C] [--token-delay-s D] [--out DIR]`

One stack per blob store (SR3D_BLOB_STORE), loopback only: one redis-server (AOF everysec, as deployed), one
`sr3d gateway`, N echo workers (loadtests/echo_worker.py: the production Worker and Pipeline, with the
model replaced by EchoEngine: --first-token-delay-s, then --max-tokens tokens at one per --token-delay-s, so
that as many jobs are in flight per req/s as on the GPUs). Enough worker slots (N x C) that jobs never wait
for a worker at the rates offered.

Load: open loop, Poisson arrivals at each --rates level for --duration seconds; every request uploads the
fixture clip padded to --upload-mb MB (a trailing MP4 `free` box: a valid file whose decode costs what the
clip costs, so the bytes cost the service what a large upload costs and the worker's decode does not grow),
one box region on frame 0 (the worker's point-map cache serves the depth: the model side is not measured
here), and follows its events over SSE to the terminal one (the streamed POST, as `SR3DClient.run`).

Measured per level: achieved req/s, upload MB/s accepted, SSE events/s delivered, p50/p99 of the upload
(submit -> accepted), TTFT and e2e, errors; CPU seconds of every process (/proc/<pid>/stat utime+stime
before/after: gateway, redis-server, the workers together, this load client) per request and per event
delivered (all of the process's work divided by the events, uploads included: an upper bound on what an
event costs), and cores busy over the level's wall time. The ramp stops at the first level that breaks (error rate over --max-error-rate, or e2e
p99 over --max-p99-ratio x the first level's). `ceiling` extrapolates per process: one core / CPU seconds
per request (gateway and Redis each run one event loop on one core), and names the process that runs out
first. Prints JSON; --out DIR writes DIR/ceiling.json and DIR/ceiling.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.bench_workers import _run_or_lost, job_problems
from loadtests.report import percentile
from loadtests.scenarios import VIDEO, VIDEO_SIZE, fixture, question_for, random_box
from service.client import JobRequest, JobResult, Media, SR3DClient
from service.local_stack import Proc, Stack, rss_bytes

CLK_TCK = os.sysconf("SC_CLK_TCK")
SINGLE_LOOP = ("gateway", "redis")  # one event loop each: capped at one core however many the host has


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rates", default="2,4,8,16,24,32,40", help="offered requests/s, one level each (default 2..40)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals per level (default 15)")
    p.add_argument("--upload-mb", default="20",
                   help="comma list of upload sizes in MB, one ramp each on the same stack (the clip padded; "
                        "0 = the clip as is, 88 KB; default 20)")
    p.add_argument("--blob-stores", default="redis", help="comma list of SR3D_BLOB_STORE values, one stack each")
    p.add_argument("--workers", type=int, default=2, help="echo worker processes (default 2)")
    p.add_argument("--worker-concurrency", type=int, default=200, help="SR3D_WORKER_CONCURRENCY of each (default 200)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--num-frames", type=int, default=32)
    p.add_argument("--token-delay-s", type=float, default=0.0125,
                   help="echo engine's gap between tokens (default 0.0125: 64 tokens in 0.8 s, the H200 run's decode)")
    p.add_argument("--first-token-delay-s", type=float, default=4.8,
                   help="echo engine's wait before the first token (default 4.8: the H200 run's TTFT at two workers, "
                        "so that as many jobs are in flight per req/s as on the GPUs)")
    p.add_argument("--max-error-rate", type=float, default=0.01)
    p.add_argument("--max-p99-ratio", type=float, default=3.0, help="e2e p99 over this x the first level's = broken")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for ceiling.json + ceiling.png")


# ----------------------------------------------------------------------------- the upload
def padded_clip(mb: float) -> Media:
    """The fixture clip followed by one top-level `free` box, `mb` MB in all (never less than the clip).
    ISO BMFF readers skip `free` boxes, so the worker decodes exactly the clip."""
    clip = fixture(VIDEO).read_bytes()
    pad = int(mb * 1e6) - len(clip)
    if pad < 8:
        return Media("video", VIDEO.name, clip, "video/mp4")
    return Media("video", VIDEO.name, clip + struct.pack(">I", pad) + b"free" + bytes(pad - 8), "video/mp4")


def make_request(rng: random.Random, media: Media, max_tokens: int, num_frames: int) -> JobRequest:
    w, h = VIDEO_SIZE
    opts = {"max_tokens": max_tokens, "num_frames": num_frames, "temperature": 0.0, "ignore_eos": True}
    return JobRequest(media, question_for(1, rng), [[{"frame": 0, "box": random_box(rng, w, h)}]], options=opts)


# ----------------------------------------------------------------------------- CPU accounting
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) and of its reaped children (Redis forks one for
    every AOF rewrite), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK  # fields 14-17 of stat(5), after pid and comm


@dataclass
class Procs:
    """The processes whose CPU is counted: name -> pids (the workers are one entry)."""

    groups: dict[str, list[int]]

    def sample(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.groups.items()}


def cpu_table(before: dict[str, float], after: dict[str, float], wall: float, done: int, events: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in before:
        s = after[name] - before[name]
        out[name] = {"cpu_s": round(s, 3), "cores": round(s / wall, 3) if wall else None,
                     "ms_per_request": round(1000 * s / done, 3) if done else None,
                     "us_per_event": round(1e6 * s / events, 2) if events else None}
    return out


# ----------------------------------------------------------------------------- one level
async def open_loop(url: str, rate: float, duration: float, media: Media, args: argparse.Namespace,
                    seed: int) -> tuple[list[JobResult], float]:
    """Poisson arrivals at `rate`/s for `duration` s, each followed to its end; -> results, wall time."""
    rng = random.Random(seed)
    async with SR3DClient(url, max_connections=4096) as client:
        t0 = time.perf_counter()
        tasks: list[asyncio.Task[JobResult]] = []
        at = 0.0
        while at < duration:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            req = make_request(rng, media, args.max_tokens, args.num_frames)
            tasks.append(asyncio.create_task(_run_or_lost(client, req)))
            at += rng.expovariate(rate)
        results = list(await asyncio.gather(*tasks))
        return results, time.perf_counter() - t0


async def warm_up(url: str, media: Media, args: argparse.Namespace, n_workers: int) -> None:
    """One job at a time until every worker has run one: each has its point-map cache filled (one depth
    computation each; the model side is not measured here, and concurrent misses would each compute)."""
    rng = random.Random(args.seed + 1)
    seen: set[str] = set()
    async with SR3DClient(url) as client:
        for _ in range(8 * n_workers):
            res = await client.run(make_request(rng, media, args.max_tokens, args.num_frames))
            if not res.ok:
                raise RuntimeError(f"warm-up job failed: {res.terminal or res.error_body or res.client_error}")
            seen.update(res.started_by)
            if len(seen) >= n_workers:
                return


def _q(values: list[float], q: float) -> float | None:
    v = percentile(values, q)
    return None if v is None else round(v, 4)


def level_summary(rate: float, duration: float, results: list[JobResult], wall: float, size: int, cpu: dict[str, Any],
                  redis_info: dict[str, Any]) -> dict[str, Any]:
    accepted = [r for r in results if r.job_id is not None and r.http_status in (200, 202)]
    done = [r for r in accepted if r.terminal is not None and r.terminal.type == "done"]
    events = sum(len(r.events) for r in results)
    rejected: dict[str, int] = {}
    for r in results:
        if r not in accepted:
            key = str(r.http_status) if r.http_status is not None else "no response"
            rejected[key] = rejected.get(key, 0) + 1
    problems = job_problems(results)
    failed = len(results) - len(done)
    uploads = [r.t_accepted - r.t_submit for r in accepted if r.t_accepted is not None]
    e2e = [r.e2e for r in done if r.e2e is not None]
    timings = [r.terminal.data.get("timings", {}) for r in done if r.terminal is not None and isinstance(r.terminal.data, dict)]
    return {
        "offered_req_per_s": rate, "requests": len(results), "accepted": len(accepted), "done": len(done),
        "rejected": rejected, "error_rate": round(failed / len(results), 4) if results else None,
        "problems": problems[:10], "wall_s": round(wall, 3),
        # carried: jobs finished per second of arrivals (= offered while the stack keeps up: then the
        # latencies stay flat); the rates below are over the whole wall time, the drain included
        "req_per_s": round(len(done) / duration, 3), "in_flight": round(len(done) / duration * (percentile(e2e, 50) or 0), 1),
        "upload_mb_per_s": round(len(accepted) * size / 1e6 / wall, 2),
        "events": events, "events_per_request": round(events / len(done), 1) if done else None,
        "events_per_s": round(events / wall, 1),
        "upload_s": {"p50": _q(uploads, 50), "p99": _q(uploads, 99)},
        "ttft_s": {"p50": _q([r.ttft for r in done if r.ttft is not None], 50),
                   "p99": _q([r.ttft for r in done if r.ttft is not None], 99)},
        "e2e_s": {"p50": _q(e2e, 50), "p99": _q(e2e, 99)},
        # the worker's side (from the `done` event): a queue wait here would mean too few worker slots
        "worker_s": {k: {"p50": _q([t[k] for t in timings if k in t], 50), "p99": _q([t[k] for t in timings if k in t], 99)}
                     for k in ("queue_wait_s", "decode_s", "pointmaps_s", "encode_s")},
        "cpu": cpu, "cores_busy": round(sum(c["cores"] or 0 for c in cpu.values()), 2), "redis": redis_info,
    }


def broken(level: dict[str, Any], first: dict[str, Any], args: argparse.Namespace) -> str | None:
    """Why this level counts as past the ceiling, or None."""
    if level["error_rate"] is None or level["error_rate"] > args.max_error_rate:
        return f"error rate {level['error_rate']} > {args.max_error_rate} (rejected {level['rejected']})"
    p99, base = level["e2e_s"]["p99"], first["e2e_s"]["p99"]
    if p99 is not None and base and p99 > args.max_p99_ratio * base:
        return f"e2e p99 {p99} s > {args.max_p99_ratio} x the first level's {base} s"
    return None


def redis_facts(redis_url: str) -> dict[str, Any]:
    import redis as sync_redis

    r = sync_redis.Redis.from_url(redis_url)
    try:
        mem, pers = r.info("memory"), r.info("persistence")
        return {"used_memory_peak_mb": round(mem["used_memory_peak"] / 1e6, 1),
                "aof_mb": round(pers.get("aof_current_size", 0) / 1e6, 1)}
    finally:
        r.close()


# ----------------------------------------------------------------------------- one stack
def run_store(args: argparse.Namespace, store: str, rates: list[float], sizes: list[float], work: Path) -> list[dict[str, Any]]:
    """One stack with this blob store; one ramp per upload size -> one entry per size."""
    users = int(max(rates) * 10)
    env = {"SR3D_LOG_LEVEL": "WARNING", "SR3D_BLOB_STORE": store, "SR3D_DATA_DIR": str(work / "data"),
           "SR3D_QUEUE_MAX": str(max(1024, users * 4)), "SR3D_MAX_TOKENS": str(max(512, args.max_tokens)),
           "SR3D_MAX_FRAMES": str(max(64, args.num_frames + 1)), "SR3D_MAX_UPLOAD_MB": str(max(64, 2 * max(sizes))),
           "SR3D_WORKER_CONCURRENCY": str(args.worker_concurrency),
           "SR3D_ECHO_TOKEN_DELAY_S": str(args.token_delay_s),
           "SR3D_ECHO_FIRST_TOKEN_DELAY_S": str(args.first_token_delay_s)}
    entries: list[dict[str, Any]] = []
    with Stack(work / f"stack-{store}", env) as st:
        redis = st.start_redis()
        gw, url = st.start_gateway()
        workers = [st.start_module(f"echo-worker{i}", "loadtests.echo_worker") for i in range(args.workers)]
        st.wait_ready(url, gw)
        procs = Procs({"gateway": [gw.pid], "redis": [redis.pid], "workers": [w.pid for w in workers],
                       "client": [os.getpid()]})
        for mb in sizes:
            media = padded_clip(mb)
            out: dict[str, Any] = {"blob_store": store, "upload_mb": mb, "upload_bytes": len(media.content), "levels": []}
            entries.append(out)
            asyncio.run(warm_up(url, media, args, len(workers)))
            ramp(args, st, procs, url, media, rates, out)
            out["ceiling"] = ceiling(out["levels"], mb)
        for w in workers:
            st.stop(w, signal.SIGTERM, timeout=30)
    return entries


def ramp(args: argparse.Namespace, st: Stack, procs: Procs, url: str, media: Media, rates: list[float],
         out: dict[str, Any]) -> None:
    """The levels of one upload size, up to the first that breaks."""
    gw_pid, redis_pid = procs.groups["gateway"][0], procs.groups["redis"][0]
    first: dict[str, Any] | None = None
    for i, rate in enumerate(rates):
        before = procs.sample()
        results, wall = asyncio.run(open_loop(url, rate, args.duration, media, args, args.seed + 10 + i))
        after = procs.sample()
        n_done = sum(1 for r in results if r.terminal is not None and r.terminal.type == "done")
        cpu = cpu_table(before, after, wall, n_done, sum(len(r.events) for r in results))
        level = level_summary(rate, args.duration, results, wall, len(media.content), cpu, redis_facts(st.redis_url))
        level["rss_mb"] = {"gateway": round((rss_bytes(gw_pid) or 0) / 1e6, 1),
                           "redis": round((rss_bytes(redis_pid) or 0) / 1e6, 1)}
        first = first or level
        level["broken"] = broken(level, first, args)
        out["levels"].append(level)
        print(json.dumps({"store": out["blob_store"], "upload_mb": out["upload_mb"], "offered": rate, "req_per_s": level["req_per_s"],
                          "e2e_p99": level["e2e_s"]["p99"], "cores": {k: v["cores"] for k, v in cpu.items()},
                          "broken": level["broken"]}), file=sys.stderr)
        if level["broken"]:
            break


def ceiling(levels: list[dict[str, Any]], upload_mb: float) -> dict[str, Any]:
    """Per process: CPU ms per request (median over the levels that held), and the req/s at which one
    core is used up. The single-loop processes (gateway, Redis) cannot use a second core; the workers
    and the client can be more processes, so theirs is per core."""
    held = [lv for lv in levels if not lv["broken"] and lv["done"]] or levels[:1]
    per: dict[str, Any] = {}
    for name in held[0]["cpu"]:
        ms = [lv["cpu"][name]["ms_per_request"] for lv in held if lv["cpu"][name]["ms_per_request"]]
        us = [lv["cpu"][name]["us_per_event"] for lv in held if lv["cpu"][name]["us_per_event"]]
        if not ms:
            continue
        m = statistics.median(ms)
        per[name] = {"ms_per_request": round(m, 3), "us_per_event": round(statistics.median(us), 2) if us else None,
                     "req_per_s_per_core": round(1000 / m, 1) if m else None,
                     "max_cores": 1 if name in SINGLE_LOOP else None}
    epr = statistics.median([lv["events_per_request"] for lv in held if lv["events_per_request"]] or [0])
    single = {k: v for k, v in per.items() if k in SINGLE_LOOP and v["req_per_s_per_core"]}
    first = min(single, key=lambda k: single[k]["req_per_s_per_core"]) if single else None
    last_ok = held[-1]
    return {"per_process": per, "events_per_request": epr, "upload_mb": upload_mb,
            "first_to_saturate": first,
            "req_per_s": single[first]["req_per_s_per_core"] if first else None,
            "events_per_s": round(single[first]["req_per_s_per_core"] * epr) if first else None,
            "highest_rate_held": last_ok["offered_req_per_s"],
            "broke_at": next((lv["offered_req_per_s"] for lv in levels if lv["broken"]), None),
            "why": next((lv["broken"] for lv in levels if lv["broken"]), None)}


# ----------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    try:
        rates = [float(x) for x in args.rates.split(",")]
        sizes = [float(x) for x in args.upload_mb.split(",")]
        stores = [s.strip() for s in args.blob_stores.split(",") if s.strip()]
    except ValueError:
        print(f"--rates must be comma-separated numbers, got {args.rates!r}", file=sys.stderr)
        return 2
    if not rates or min(rates) <= 0 or any(s not in ("redis", "dir") for s in stores) or not stores:
        print("--rates must be > 0; --blob-stores takes redis and/or dir", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"config": {
        "title": "sr3d bench ceiling", "rates": rates, "duration_s": args.duration, "upload_mb": sizes,
        "blob_stores": stores, "workers": args.workers, "worker_concurrency": args.worker_concurrency,
        "max_tokens": args.max_tokens, "num_frames": args.num_frames, "token_delay_s": args.token_delay_s,
        "first_token_delay_s": args.first_token_delay_s,
        "cpu_count": os.cpu_count(), "load_at_start": list(os.getloadavg())}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="sr3d-bench-ceiling-") as tmp:
        for store in stores:
            report["runs"] += run_store(args, store, rates, sizes, Path(tmp))
            save(report, args.out)
    report["config"]["load_at_end"] = list(os.getloadavg())
    problems = [p for r in report["runs"] for lv in r["levels"] if not lv["broken"] for p in lv["problems"]]
    report["ok"] = not problems
    if args.out:
        save(report, args.out)
        _plot(report, Path(args.out) / "ceiling.png")
        report["files"] = [str(Path(args.out) / "ceiling.json"), str(Path(args.out) / "ceiling.png")]
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


def save(report: dict[str, Any], out: str | None) -> None:
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "ceiling.json").write_text(json.dumps(report, indent=2) + "\n")


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.5))
    top = max(report["config"]["rates"])
    a.plot([0, top], [0, top], color="grey", ls=":", lw=1, label="offered")
    for run_ in report["runs"]:
        lv = run_["levels"]
        xs = [x["offered_req_per_s"] for x in lv]
        tag = f"blobs={run_['blob_store']}, {run_['upload_mb']:g} MB"
        a.plot(xs, [x["req_per_s"] for x in lv], marker="o", label=tag)
        b.plot(xs, [x["e2e_s"]["p99"] or 0 for x in lv], marker="o", label=f"{tag} e2e p99")
        b.plot(xs, [x["upload_s"]["p99"] or 0 for x in lv], marker="x", ls="--", label=f"{tag} upload p99")
    names = ("gateway", "redis", "workers", "client")
    width = 0.8 / max(1, len(report["runs"]))
    for k, run_ in enumerate(report["runs"]):
        per = run_.get("ceiling", {}).get("per_process", {})
        c.bar([i + k * width for i in range(len(names))], [(per.get(n) or {}).get("ms_per_request") or 0 for n in names],
              width=width, label=f"blobs={run_['blob_store']}, {run_['upload_mb']:g} MB")
    c.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    a.set(title="carried vs offered", xlabel="offered req/s", ylabel="req/s done")
    b.set(title="latency (client)", xlabel="offered req/s", ylabel="s")
    c.set(title="CPU per job (median of the levels that held)", ylabel="ms of CPU per job")
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
