"""Workers on several GPUs sharing one queue: requests/s with 1 vs N workers, TTFT, and a SIGKILL mid-load.

`sr3d bench workers [--workers 1,2] [--duration S] [--concurrency N] [--num-frames F] [--max-tokens T]
                    [--kill-one] [--gpus auto|none|0,1] [--dummy-8b] [--out DIR]`

One run, one stack, loopback only: one redis-server, one `sr3d gateway`, max(--workers) `sr3d worker`
processes; worker i is pinned to GPU i with CUDA_VISIBLE_DEVICES (NVLink multicast off: NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1). Every worker starts once, all in parallel (a
vLLM start takes minutes), and the levels run from the most workers down: before a level with fewer workers
the newest ones get SIGTERM (they drain, nothing is redelivered). With --kill-one, after the largest level
and before the next, one more phase runs at that size in which the newest worker is SIGKILLed mid-job
(on a token of a job it runs, past half the phase); it is kept apart from the measured levels so that the
kill does not bend the scaling ratio, and it is the step that takes the worker away.

Load: closed loop, the same number of users at every level (default 2 x max workers x worker concurrency,
so even the largest level is saturated), each sending the standard request again and again: the bottle
clip, --num-frames sampled frames, one box region on a random frame, exactly --max-tokens new tokens
(ignore_eos). The point-map cache is off (SR3D_POINTMAP_CACHE_MB=0) so every request pays decode + depth
whichever worker gets it. Latencies are the client's (TTFT includes the queue wait).

Checked at every level, from the clients' side: each accepted job ends with exactly one terminal event
(`done` or `error`), nothing lost (no client gave up), no event duplicated or out of order; after the kill
the killed job is finished by another worker, the group ends with nothing pending or dead-lettered, and the
killed worker leaves no process behind. Any problem -> "ok": false and exit status 1 (the numbers are
still written). Prints JSON; --out DIR writes DIR/workers.json (after every phase) and DIR/workers.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests import report as rpt
from loadtests.scenarios import VIDEO_FRAMES, VIDEO_SIZE, Outcome, question_for, random_box, video_media
from service.client import JobRequest, JobResult, SR3DClient, SSEEvent
from service.consumer_name import consumer_is
from service.local_stack import Proc, Stack, pids_alive, queue_state

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
RESUME_TIMEOUT_S = 180.0  # a client keeps resuming this long without progress (reclaim + rerun fit inside)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts, one level each (default 1,2)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load per level (default 60)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="closed-loop users at every level (default and minimum: 2 x max workers x worker concurrency)")
    p.add_argument("--worker-concurrency", type=int, default=int(os.environ.get("SR3D_WORKER_CONCURRENCY", "4")),
                   help="SR3D_WORKER_CONCURRENCY of each worker (default: that variable, else 4)")
    p.add_argument("--num-frames", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--kill-one", action="store_true", help="extra phase at the largest level: SIGKILL one worker mid-load")
    p.add_argument("--gpus", default="auto", help="auto (all visible GPUs, else CPU) | none (CPU) | comma-separated ids")
    p.add_argument("--dummy-8b", action="store_true",
                   help="vLLM engine on NVILA-Lite-8B shapes with random weights (load_format=dummy), a tokenizer "
                        "covering its whole vocabulary, and a "
                        "Depth-Anything-V2-Large-shaped random depth model, built under --work-dir")
    p.add_argument("--work-dir", type=Path, default=None, help="stack logs, data dir, built checkpoints (default: temp)")
    p.add_argument("--ready-timeout", type=float, default=420.0, help="seconds a worker may take to become ready")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for workers.json + workers.png")


# ----------------------------------------------------------------------------- configuration
def resolve_gpus(spec: str, n: int) -> list[str] | None:
    """GPU id per worker (None = CPU workers). Raises ValueError when there are fewer GPUs than workers."""
    if spec == "none":
        return None
    if spec == "auto":
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            return None
        ids = [str(i) for i in range(count)]
    else:
        ids = [g.strip() for g in spec.split(",") if g.strip()]
    if len(ids) < n:
        raise ValueError(f"{n} workers need {n} GPUs; have {ids}")
    return ids[:n]


def worker_env(gpu: str | None, n_workers: int) -> dict[str, str]:
    if gpu is None:  # CPU worker: hide any GPU so that SR3D_DEVICE=auto cannot pick one up
        return {"CUDA_VISIBLE_DEVICES": ""}
    # A GPU worker's CPU side (decode, tiling, point-map pooling) gets its share of the host's cores, as a
    # pod with a CPU limit would; the stack's default of one thread is for CPU runs on a shared box.
    threads = str(max(1, (os.cpu_count() or 1) // n_workers))
    return {"CUDA_VISIBLE_DEVICES": gpu, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **NO_MULTICAST}


def stack_env(args: argparse.Namespace, users: int, work: Path, gpus: list[str] | None) -> dict[str, str]:
    """SR3D_* for every service process; a variable already set in the environment wins (except concurrency)."""
    env = {
        "SR3D_LOG_LEVEL": "WARNING",
        "SR3D_DATA_DIR": str(work / "data"),
        "SR3D_POINTMAP_CACHE_MB": "0",
        # reclaim a dead worker's jobs within seconds; live ones heartbeat well inside that
        "SR3D_CLAIM_IDLE_MS": "5000",
        "SR3D_HEARTBEAT_S": "1",
        "SR3D_QUEUE_MAX": str(max(256, 4 * users)),
        "SR3D_MAX_TOKENS": str(max(512, args.max_tokens)),
        "SR3D_MAX_FRAMES": str(max(64, args.num_frames + 1)),  # + the region's own frame
    }
    if gpus is None:
        env["SR3D_DEVICE"] = "cpu"
    if args.dummy_8b:
        env.update(dummy_8b_env(work))
    env = {k: v for k, v in env.items() if k not in os.environ}
    env["SR3D_WORKER_CONCURRENCY"] = str(args.worker_concurrency)
    return env


def dummy_8b_env(work: Path) -> dict[str, str]:
    """Build the flat NVILA-Lite-8B config + full-vocabulary tokenizer that vLLM fills with random weights,
    and a random Depth-Anything-V2-Large-shaped depth model; -> the env that makes the workers use them."""
    from types import SimpleNamespace

    from loadtests.bench_engine import _model_dir
    from model.geometry.depth_anything import build_large_shaped_depth_model

    flat, _, load_format = _model_dir(SimpleNamespace(config="nvila-lite-8b"), work)
    depth = work / "depth-large"
    if not (depth / "config.json").exists():
        build_large_shaped_depth_model(str(depth))
    return {"SR3D_ENGINE": "vllm", "SR3D_MODEL": str(flat), "SR3D_VLLM_LOAD_FORMAT": load_format,
            "SR3D_DEPTH_MODEL": str(depth)}


# ----------------------------------------------------------------------------- load
@dataclass
class Workload:
    num_frames: int
    max_tokens: int


def standard_request(rng: random.Random, w: Workload) -> JobRequest:
    """The issue's workload: the clip, one box region on a random frame, exactly max_tokens new tokens."""
    width, height = VIDEO_SIZE
    region = [[{"frame": rng.randrange(VIDEO_FRAMES), "box": random_box(rng, width, height)}]]
    opts = {"max_tokens": w.max_tokens, "num_frames": w.num_frames, "temperature": 0.0, "ignore_eos": True}
    return JobRequest(video_media(), question_for(1, rng), region, options=opts)


OnEvent = Callable[[JobResult, SSEEvent], None]


async def _run_or_lost(client: SR3DClient, req: JobRequest, on_event: OnEvent | None = None) -> JobResult:
    """One job to its end; a client failure is recorded as a lost job and the load goes on."""
    try:
        return await client.run(req, on_event=on_event, resume_timeout_s=RESUME_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - see docstring
        return JobResult(t_submit=time.perf_counter(), client_error=f"{type(e).__name__}: {e}")


async def closed_loop(url: str, users: int, duration: float, make_request: Callable[[random.Random], JobRequest],
                      seed: int, on_event: OnEvent | None = None) -> tuple[list[JobResult], float]:
    """`users` users, each sending its next request (`make_request(rng)`, one seeded rng per user) when
    the previous one ended, until `duration` is over."""
    results: list[JobResult] = []
    async with SR3DClient(url) as client:
        t0 = time.perf_counter()
        deadline = t0 + duration

        async def user(i: int) -> None:
            rng = random.Random(seed * 100003 + i)
            while time.perf_counter() < deadline:
                results.append(await _run_or_lost(client, make_request(rng), on_event))

        await asyncio.gather(*(user(i) for i in range(users)))
        return results, time.perf_counter() - t0


async def open_loop(url: str, rate: float, duration: float, make_request: Callable[[random.Random], JobRequest],
                    seed: int) -> tuple[list[JobResult], float]:
    """Requests arriving at `rate` per second (Poisson: exponential gaps, seeded) for `duration` seconds,
    each sent whether or not earlier ones have finished (latency at a given load, which a closed loop
    cannot set). Returns every result and the wall time until the last one ended."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    rng = random.Random(seed)
    async with SR3DClient(url) as client:
        t0 = time.perf_counter()
        tasks: list[asyncio.Task[JobResult]] = []
        at = 0.0
        while at < duration:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            tasks.append(asyncio.create_task(_run_or_lost(client, make_request(rng))))
            at += rng.expovariate(rate)
        results = list(await asyncio.gather(*tasks))
        return results, time.perf_counter() - t0


async def burst(url: str, n: int, w: Workload, seed: int) -> list[JobResult]:
    async with SR3DClient(url) as client:
        rng = random.Random(seed)
        reqs = [standard_request(rng, w) for _ in range(n)]
        return list(await asyncio.gather(*(client.run(r, resume_timeout_s=RESUME_TIMEOUT_S) for r in reqs)))


# ----------------------------------------------------------------------------- checks
def accepted(r: JobResult) -> bool:
    return r.http_status == 200 or (r.http_status is None and r.job_id is not None)


def job_problems(results: Sequence[JobResult]) -> list[str]:
    """Every accepted job: exactly one terminal event (done or error), last; no duplicate or reordered
    event; not lost (the client did not give up). Job ids unique across clients. Rejected submits (429 at
    the queue cap) were never accepted and are counted, not judged."""
    problems: list[str] = []
    for r in results:
        if r.http_status is None and r.job_id is None:
            problems.append(f"submit failed: {r.client_error}")
            continue
        if not accepted(r):
            continue
        tag = f"job {r.job_id}"
        problems += [f"{tag}: {p}" for p in r.consistency_problems()]
        if r.client_error:
            problems.append(f"{tag}: lost: {r.client_error}")
    ids = Counter(r.job_id for r in results if accepted(r))
    problems += [f"job {j}: seen by {n} clients" for j, n in ids.items() if n > 1]
    return problems


def job_counts(results: Sequence[JobResult], worker_pids: dict[int, int]) -> dict[str, Any]:
    acc = [r for r in results if accepted(r)]
    ends = Counter(r.terminal.type if r.terminal is not None else "none" for r in acc)
    by_worker: Counter[str] = Counter()
    for r in acc:
        for consumer in r.started_by:
            idx = next((i for pid, i in worker_pids.items() if consumer_is(consumer, pid)), None)
            by_worker[f"worker{idx}" if idx is not None else consumer] += 1
    return {"accepted": len(acc), "rejected": len(results) - len(acc), "done": ends["done"], "error": ends["error"],
            "lost": ends["none"], "redeliveries": sum(max(0, len(r.started_by) - 1) for r in acc),
            "starts_by_worker": dict(sorted(by_worker.items()))}


def queue_problems(redis_url: str, timeout: float) -> tuple[dict[str, int], list[str]]:
    """Wait (bounded) for the group to settle; anything pending, lagging or dead-lettered is a problem."""
    deadline = time.monotonic() + timeout
    state = queue_state(redis_url)
    while (state["pending"] or state["lag"]) and time.monotonic() < deadline:
        time.sleep(0.2)
        state = queue_state(redis_url)
    return state, [f"queue not empty at the end: {state}"] if any(state.values()) else []


# ----------------------------------------------------------------------------- the kill
@dataclass
class Killer:
    """SIGKILL `victim` on the first token, past `arm_at`, of a job it is running (so a job is in flight)."""

    victim: Proc
    arm_at: float
    t0: float
    fired_at: float | None = None
    job_id: str | None = None
    children: list[int] = field(default_factory=list)

    def on_event(self, res: JobResult, ev: SSEEvent) -> None:
        if self.fired_at is not None or ev.type != "token" or time.perf_counter() < self.arm_at:
            return
        starts = res.started_by
        if starts and consumer_is(starts[-1], self.victim.pid):
            self.fire(res.job_id)

    def fire(self, job_id: str | None) -> None:
        if self.fired_at is not None:
            return
        self.children = self.victim.descendants()
        self.victim.signal(signal.SIGKILL)
        self.fired_at, self.job_id = time.perf_counter() - self.t0, job_id


async def killed_phase(url: str, users: int, duration: float, w: Workload, seed: int, victim: Proc) -> tuple[list[JobResult], float, Killer]:
    t0 = time.perf_counter()
    killer = Killer(victim, arm_at=t0 + duration / 2, t0=t0)

    async def fallback() -> None:  # the victim never streamed past half-time: kill it anyway, not mid-job
        await asyncio.sleep(0.9 * duration)
        killer.fire(None)

    task = asyncio.create_task(fallback())
    try:
        results, wall = await closed_loop(url, users, duration, lambda rng: standard_request(rng, w), seed, killer.on_event)
    finally:
        task.cancel()
    return results, wall, killer


def kill_problems(results: Sequence[JobResult], killer: Killer) -> list[str]:
    if killer.job_id is None:
        return []  # not mid-job: nothing to redeliver (reported as mid_job: false)
    job = next((r for r in results if r.job_id == killer.job_id), None)
    if job is None:
        return [f"killed job {killer.job_id} not among the results"]
    starts = job.started_by
    if len(starts) < 2 or consumer_is(starts[-1], killer.victim.pid):
        return [f"killed job {killer.job_id} was not rerun by another worker: starts {starts}"]
    if not job.ok:
        return [f"killed job {killer.job_id} ended with {job.terminal.type if job.terminal else None}"]
    return []


# ----------------------------------------------------------------------------- report
def level_summary(results: list[JobResult], wall: float, label: str, n_workers: int, worker_pids: dict[int, int],
                  slo: rpt.SLO) -> tuple[dict[str, Any], list[Outcome]]:
    outs = [Outcome("video_1region", r, r.ok and not r.consistency_problems(), r.consistency_problems()) for r in results]
    s = rpt.summarize(outs, wall, slo, label)
    s.update(workers=n_workers, jobs=job_counts(results, worker_pids))
    return s, outs


def scaling(levels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """req/s of N workers over 1 worker; target 0.9 x N (the issue's 1.8x for two)."""
    one = next((lv for lv in levels if lv["workers"] == 1 and not lv.get("killed")), None)
    out = []
    for lv in levels:
        if lv["workers"] > 1 and not lv.get("killed") and one and one["req_per_s"]:
            ratio = round(lv["req_per_s"] / one["req_per_s"], 3)
            out.append({"workers": lv["workers"], "ratio_req_per_s": ratio, "target": round(0.9 * lv["workers"], 2),
                        "met": ratio >= 0.9 * lv["workers"]})
    return out


def save(report: dict[str, Any], out: str | None) -> None:
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "workers.json").write_text(json.dumps(report, indent=2) + "\n")


# ----------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    try:
        levels = sorted({int(x) for x in args.workers.split(",")}, reverse=True)
    except ValueError:
        print(f"--workers must be comma-separated integers, got {args.workers!r}", file=sys.stderr)
        return 2
    if levels[-1] < 1 or (args.kill_one and levels[0] < 2):
        print("--workers: counts must be >= 1, and --kill-one needs a level with >= 2 workers", file=sys.stderr)
        return 2
    try:
        gpus = resolve_gpus(args.gpus, levels[0])
    except ValueError as e:
        print(f"--gpus: {e}", file=sys.stderr)
        return 2
    floor = 2 * levels[0] * args.worker_concurrency
    users = args.concurrency or floor
    if users < floor:
        print(f"--concurrency {users} does not saturate {levels[0]} workers x {args.worker_concurrency}: use >= {floor}",
              file=sys.stderr)
        return 2
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        return _run(args, levels, gpus, users, args.work_dir)
    with tempfile.TemporaryDirectory(prefix="sr3d-bench-workers-") as tmp:
        return _run(args, levels, gpus, users, Path(tmp))


def _run(args: argparse.Namespace, levels: list[int], gpus: list[str] | None, users: int, work: Path) -> int:
    w = Workload(args.num_frames, args.max_tokens)
    slo = rpt.SLO()
    env = stack_env(args, users, work, gpus)
    report: dict[str, Any] = {
        "config": {"title": "sr3d bench workers", "workers": levels[::-1], "users": users,
                   "worker_concurrency": args.worker_concurrency, "duration_s": args.duration,
                   "num_frames": w.num_frames, "max_tokens": w.max_tokens, "ignore_eos": True, "regions": 1,
                   "gpus": gpus, "engine": os.environ.get("SR3D_ENGINE", env.get("SR3D_ENGINE", "torch")),
                   "model": os.environ.get("SR3D_MODEL", env.get("SR3D_MODEL", "tiny demo checkpoint")),
                   "kill_one": args.kill_one, "cpu_count": os.cpu_count(),
                   "env": {k: v for k, v in env.items() if k != "SR3D_DATA_DIR"},
                   "worker_env": worker_env(gpus[0] if gpus else None, levels[0])},
        "slo": {"ttft_s": slo.ttft_s, "itl_s": slo.itl_s, "e2e_s": slo.e2e_s},
    }
    measured: dict[int, tuple[dict[str, Any], list[Outcome]]] = {}
    killed: tuple[dict[str, Any], list[Outcome]] | None = None
    problems: list[str] = []
    with Stack(work / "stack", env) as st:
        st.start_redis()
        gw, url = st.start_gateway()
        active = [(*st.start_worker(env=worker_env(gpus[i] if gpus else None, levels[0])), i) for i in range(levels[0])]
        pids = {p.pid: i for p, _, i in active}
        t0 = time.perf_counter()
        st.wait_ready(url, gw)
        for p, wurl, _ in active:
            st.wait_ready(wurl, p, timeout=args.ready_timeout)
        report["start_s"] = round(time.perf_counter() - t0, 2)
        # warm-up: every worker runs a few jobs (lazy init, compile, CUDA graphs) before anything is timed
        warm = asyncio.run(burst(url, 2 * len(active) * args.worker_concurrency, w, args.seed + 7))
        report["warmup"] = job_counts(warm, pids)
        problems += job_problems(warm)
        print(json.dumps({"phase": "warm-up", **report["warmup"]}), file=sys.stderr)
        for n in levels:
            while len(active) > n:  # fewer workers: the newest drains and exits (no redelivery)
                p, _, i = active.pop()
                rc = st.stop(p, signal.SIGTERM, timeout=120)
                if rc != 0:
                    problems.append(f"worker{i} exited with {rc} after SIGTERM")
            results, wall = asyncio.run(closed_loop(url, users, args.duration, lambda rng: standard_request(rng, w), args.seed + n))
            label = f"{n} worker{'s' if n > 1 else ''}"
            measured[n] = level_summary(results, wall, label, n, pids, slo)
            problems += job_problems(results)
            _progress(measured[n][0])
            if args.kill_one and n == levels[0]:
                st.track_descendants()
                victim, _, vi = active.pop()
                results, wall, killer = asyncio.run(killed_phase(url, users, args.duration, w, args.seed + 99, victim))
                victim.wait(10)
                summary, outs = level_summary(results, wall, f"{n} workers, worker{vi} SIGKILLed", n, pids, slo)
                state, qp = queue_problems(st.redis_url, timeout=60)
                orphans_deadline = time.monotonic() + 15
                while pids_alive(killer.children) and time.monotonic() < orphans_deadline:
                    time.sleep(0.2)
                orphans = pids_alive(killer.children)
                kp = job_problems(results) + kill_problems(results, killer) + qp
                if orphans:
                    kp.append(f"processes of the killed worker still alive: {orphans}")
                summary.update(killed=True, kill={
                    "worker": vi, "pid": victim.pid, "at_s": round(killer.fired_at or 0, 3),
                    "mid_job": killer.job_id is not None, "job": killer.job_id,
                    "redeliveries": summary["jobs"]["redeliveries"], "queue_after": state, "orphans": orphans,
                    "problems": kp, "ok": not kp})
                killed = (summary, outs)
                problems += kp
                _progress(summary)
            report["levels"] = _ordered(measured, killed)
            save(report, args.out)
        state, qp = queue_problems(st.redis_url, timeout=60)
        report["queue_at_end"] = state
        problems += qp
        for p, _, i in active:
            if not p.alive():
                problems.append(f"worker{i} died: {p.log_tail(800)}")
    if st.leaked:
        problems.append(f"processes outlived the stack: {st.leaked}")
    extra = {k: v for k, v in report.items() if k not in ("levels", "config", "slo")}
    levels_out = _ordered(measured, killed)
    report = {**rpt.build_report(levels_out, report["config"], slo), **extra, "scaling": scaling(levels_out),
              "problems": problems[:50], "ok": not problems}
    if args.out:
        paths = rpt.write(report, [o for _, o in _ordered_pairs(measured, killed)], args.out, "workers")
        report["files"] = [str(p) for p in paths]
        save(report, args.out)
    print(json.dumps(report, indent=2))
    return 0 if not problems else 1


def _ordered_pairs(measured: dict[int, tuple[dict[str, Any], list[Outcome]]],
                   killed: tuple[dict[str, Any], list[Outcome]] | None) -> list[tuple[dict[str, Any], list[Outcome]]]:
    """Measured levels by worker count (1 first: the ratios' base), then the kill phase."""
    return [measured[n] for n in sorted(measured)] + ([killed] if killed else [])


def _ordered(measured: dict[int, tuple[dict[str, Any], list[Outcome]]],
             killed: tuple[dict[str, Any], list[Outcome]] | None) -> list[dict[str, Any]]:
    return [s for s, _ in _ordered_pairs(measured, killed)]


def _progress(s: dict[str, Any]) -> None:
    print(json.dumps({"level": s["label"], "req_per_s": s["req_per_s"], "ttft_p50": s["ttft_s"]["p50"],
                      "jobs": s["jobs"]}), file=sys.stderr)
