"""`sr3d tiny-checkpoint DIR [--seed N]`: write the tiny random NVILA-layout checkpoint (tests, demo)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from model.checkpoint import build_tiny_checkpoint  # torch is imported only when the command runs

    out = Path(args.dir)
    if out.exists() and any(out.iterdir()) and not args.force:
        print(json.dumps({"error": {"code": "exists", "message": f"{out} is not empty (use --force)"}}))
        return 2
    build_tiny_checkpoint(out, seed=args.seed)
    print(json.dumps({"checkpoint": str(out), "seed": args.seed}))
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny-checkpoint", help="write a tiny random SR-3D checkpoint (NVILA layout) for tests and demos")
    p.add_argument("dir", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into a non-empty directory")
    p.set_defaults(func=run)
