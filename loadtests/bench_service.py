"""Load-test the HTTP service with a realistic request mix (TTFT, ITL, e2e, req/s, goodput).

`sr3d bench service` starts its own `sr3d serve` on a free loopback port (tiny demo model unless
SR3D_MODEL is set) or targets --url. Closed loop (--concurrency N: N users, each sends its next
request when the previous one ended) or open loop (--rate R: Poisson arrivals, R req/s). Several
comma-separated levels run back to back against the same service, and the report gives ratios
against the first level: the within-run comparison. Prints JSON; --out DIR also writes a PNG.
Only loopback targets unless --allow-remote: a load test is not something to aim at a stranger.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from loadtests import report as rpt
from loadtests import soak
from loadtests.load import closed_loop, open_loop
from loadtests.scenarios import LoadConfig, Outcome, parse_mix
from service.local_stack import is_loopback_url, serve_stack


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="target service (default: start `sr3d serve` on a free loopback port)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--concurrency", default=None, help="closed loop: users per level, e.g. 1,4 (default 1,4)")
    g.add_argument("--rate", default=None, help="open loop: Poisson arrivals per second per level, e.g. 0.5,1")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per level (default 20)")
    p.add_argument("--out", help="directory for service.json + service.png")
    p.add_argument("--mix", help="scenario weights, e.g. video_regions=3,image=1 (default: the standard mix)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--num-frames", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key")
    p.add_argument("--slo-ttft", type=float, default=rpt.SLO.ttft_s)
    p.add_argument("--slo-itl", type=float, default=rpt.SLO.itl_s)
    p.add_argument("--slo-e2e", type=float, default=rpt.SLO.e2e_s)
    p.add_argument("--soak", action="store_true", help="soak: RSS + Redis keys over --duration (see loadtests/soak.py)")
    p.add_argument("--soak-ttl", type=int, default=20, help="soak: SR3D_JOB_TTL_S for the stack it starts")


def run_levels(url: str, args: argparse.Namespace) -> tuple[dict[str, Any], list[list[Outcome]]]:
    mix = parse_mix(args.mix)
    cfg = LoadConfig(max_tokens=args.max_tokens, num_frames=args.num_frames)
    slo = rpt.SLO(args.slo_ttft, args.slo_itl, args.slo_e2e)
    mode = "rate" if args.rate else "concurrency"
    levels_arg = args.rate or args.concurrency or "1,4"
    levels, per_level = [], []
    # one warm-up request so the first level does not pay for lazy initialisation
    asyncio.run(closed_loop(url, 1, 0.0, {"video_regions": 1.0}, cfg, args.seed, args.api_key))
    for raw in levels_arg.split(","):
        if mode == "rate":
            outs, wall = asyncio.run(open_loop(url, float(raw), args.duration, mix, cfg, args.seed, args.api_key))
            label = f"rate={raw}/s"
        else:
            outs, wall = asyncio.run(closed_loop(url, int(raw), args.duration, mix, cfg, args.seed, args.api_key))
            label = f"users={raw}"
        levels.append(rpt.summarize(outs, wall, slo, label))
        per_level.append(outs)
        print(json.dumps({"level": label, "req_per_s": levels[-1]["req_per_s"], "error_rate": levels[-1]["error_rate"]}),
              file=sys.stderr)
    config = {"title": "sr3d bench service", "url": url, "mode": mode, "levels": levels_arg, "duration_s": args.duration,
              "mix": mix, "max_tokens": cfg.max_tokens, "num_frames": cfg.num_frames, "seed": args.seed}
    return rpt.build_report(levels, config, slo), per_level


def run(args: argparse.Namespace) -> int:
    if args.url and not args.allow_remote and not is_loopback_url(args.url):
        print(f"refusing non-loopback target {args.url!r}; pass --allow-remote if you own it", file=sys.stderr)
        return 2
    if args.soak:
        return soak.run(args)
    if args.url:
        report, per_level = run_levels(args.url.rstrip("/"), args)
    else:
        with tempfile.TemporaryDirectory(prefix="sr3d-bench-") as tmp, serve_stack(Path(tmp), _own_env()) as (_, url):
            report, per_level = run_levels(url, args)
    if args.out:
        paths = rpt.write(report, per_level, args.out, "service")
        report["files"] = [str(p) for p in paths]
    print(json.dumps(report, indent=2))
    return 0


def _own_env() -> dict[str, str]:
    """Settings for the service this benchmark starts: CPU-friendly defaults, overridable from the env.

    Its data dir (embedded Redis, tiny checkpoint) is a fresh temp dir unless SR3D_DATA_DIR is set,
    so a benchmark never shares Redis state with a `make run` on the same machine."""
    import os

    env = {"SR3D_LOG_LEVEL": "WARNING"}
    if os.environ.get("SR3D_DATA_DIR"):
        env["SR3D_DATA_DIR"] = os.environ["SR3D_DATA_DIR"]
    return env
