"""`sr3d bench TARGET`: each benchmark is a module here (`add_arguments(parser)` + `run(args)`); the
`sr3d` CLI dispatches to this one (service/cli.py), so service/ never imports benchmark code."""
from __future__ import annotations

import argparse
from types import ModuleType

from loadtests import (
    bench_blobs,
    bench_ceiling,
    bench_engine,
    bench_measure,
    bench_media,
    bench_model,
    bench_peer,
    bench_pipeline,
    bench_queue,
    bench_service,
    bench_workers,
)

TARGETS: dict[str, ModuleType] = {
    "model": bench_model,
    "media": bench_media,
    "engine": bench_engine,
    "service": bench_service,
    "queue": bench_queue,
    "workers": bench_workers,
    "pipeline": bench_pipeline,
    "blobs": bench_blobs,
    "ceiling": bench_ceiling,
    "measure": bench_measure,
    "peer": bench_peer,
}


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark; prints JSON (and writes a PNG plot with --out)")
    targets = p.add_subparsers(dest="target", required=True)
    for name, mod in TARGETS.items():
        tp = targets.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None)
        mod.add_arguments(tp)
        tp.set_defaults(func=mod.run)
