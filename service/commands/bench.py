"""`sr3d bench TARGET`: benchmarks live in `loadtests/bench_<target>.py` (add_arguments + run)."""
from __future__ import annotations

import argparse
import importlib

TARGETS = ("model", "media", "engine", "service", "queue", "workers")


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark; prints JSON (and writes a PNG plot with --out)")
    targets = p.add_subparsers(dest="target", required=True)
    for t in TARGETS:
        try:
            mod = importlib.import_module(f"loadtests.bench_{t}")
        except ModuleNotFoundError as e:
            if e.name != f"loadtests.bench_{t}":
                raise
            continue
        tp = targets.add_parser(t, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None)
        mod.add_arguments(tp)
        tp.set_defaults(func=mod.run)
