"""`sr3d measure-set OUT [--scenes N] [--per-category K] [--seed S] [--views multi|single|both]`: write the
project's region-measurement set (synthetic scenes rendered with exact depth and known boxes,
model/measure/synthetic.py) in SpatialRGPT-Bench's release layout, for `sr3d eval OUT --format spatialrgpt`.
Layout and extension fields: service/eval/measure_set.py (and OUT/README.md). Deterministic for a seed.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("measure-set", help="write the synthetic region-measurement set for `sr3d eval`")
    p.add_argument("out", type=Path, help="directory to write (measure_set.json, media/, scenes/, README.md)")
    p.add_argument("--scenes", type=_positive, default=6, help="synthetic scenes (seeds SEED .. SEED+N-1)")
    p.add_argument("--per-category", type=_positive, default=2,
                   help="questions per category per scene (default 2: 6 scenes give ~380 questions)")
    p.add_argument("--seed", type=int, default=0, help="first scene seed; the item sampling seed too")
    p.add_argument("--views", choices=("multi", "single", "both"), default="multi",
                   help="multi: a 5-view video, regions masked on every view that shows them (default); "
                        "single: the reference view as a PNG; both: each question in both forms")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from service.eval.measure_set import write_set

    command = "sr3d measure-set " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["measure-set"] else ""
    summary = write_set(args.out, scenes=args.scenes, per_category=args.per_category, seed=args.seed,
                        views=args.views, command=command)
    print(f"wrote {summary.items} questions over {summary.scenes} scenes ({len(summary.categories)} categories) "
          f"to {summary.path}")
    for cat, n in sorted(summary.categories.items()):
        print(f"  {cat:<28} {n}")
    return 0
