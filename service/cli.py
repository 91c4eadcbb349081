"""`sr3d` console script. Each subcommand lives in its own module under `service/commands/`.

`bench` is the exception: the benchmarks are not part of the product (the wheel leaves them out), so
the command is there when their package (`loadtests`, the repository's loadtests/ folder) can be
imported, from a checkout or after `pip install -e ./loadtests`, and says so when it cannot.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> module exposing `add(subparsers)`; imported lazily so `sr3d ask` never loads torch.
COMMANDS = {
    "serve": "service.commands.serve",
    "gateway": "service.commands.gateway",
    "worker": "service.commands.worker",
    "ask": "service.commands.ask",
    "pointmaps": "service.commands.pointmaps",
    "rgbd-npz": "service.commands.rgbd_npz",  # a folder like tests/data/rgbd -> the scene .npz (--rgbd, `scene`)
    "tiny-checkpoint": "service.commands.tiny_checkpoint",
    "bench": "loadtests.bench",
    "eval": "service.commands.eval",
    "measure-set": "service.commands.measure_set",  # the synthetic set `sr3d eval` runs
}

BENCH_PACKAGE = "loadtests"
NO_BENCH = ("sr3d bench: the benchmarks are not installed (they are not part of the sr3d-serving wheel); "
            "run from a source checkout after `pip install -e ./loadtests`")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="sr3d", description="Serve and query SR-3D, the 3D-aware region VLM.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, module in COMMANDS.items():
        if wanted is None or name == wanted:
            try:
                importlib.import_module(module).add(sub)
            except ModuleNotFoundError as e:
                if name != "bench" or e.name != BENCH_PACKAGE:
                    raise
                if wanted == "bench":
                    print(NO_BENCH, file=sys.stderr)
                    return 2
                sub.add_parser(name, add_help=False, help="benchmarks: not installed (see `sr3d bench`)")
        else:
            sub.add_parser(name, add_help=False)  # listed in --help without importing its module
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
