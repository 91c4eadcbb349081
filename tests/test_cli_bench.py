"""`sr3d bench` is a command where the benchmark package (`loadtests`) can be imported (a checkout, or
`pip install -e ./loadtests`), and says in one line that it is not installed where it cannot (the
product wheel ships without it). "Not installed" is simulated by an import hook that answers for the
hidden names exactly as Python does for a package that is not there (ModuleNotFoundError naming it)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from service.cli import NO_BENCH

ROOT = Path(__file__).resolve().parents[1]


def sr3d(*argv: str, hide: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    code = ("import sys\n"
            "class Hide:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name in {hide!r}:\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Hide())\n"
            "from service.cli import main\n"
            f"raise SystemExit(main({list(argv)!r}))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SR3D_")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_bench_is_a_command_where_the_benchmarks_can_be_imported() -> None:
    r = sr3d("bench", "--help")
    assert r.returncode == 0, r.stderr
    assert "{model,media,engine,service,queue,workers,pipeline,blobs,ceiling,measure,peer}" in r.stdout


def test_bench_without_the_benchmarks_says_so_in_one_line_and_exits_2() -> None:
    r = sr3d("bench", "service", "--duration", "1", hide=("loadtests",))
    assert (r.returncode, r.stdout, r.stderr) == (2, "", NO_BENCH + "\n")
    assert "not installed" in NO_BENCH and "pip install -e ./loadtests" in NO_BENCH


def test_the_other_commands_work_without_the_benchmarks() -> None:
    r = sr3d("--help", hide=("loadtests",))
    assert r.returncode == 0, r.stderr
    assert "bench" in r.stdout and "eval" in r.stdout  # still listed
    for cmd in ("serve", "eval", "ask"):
        r = sr3d(cmd, "--help", hide=("loadtests", "tests"))
        assert r.returncode == 0 and f"usage: sr3d {cmd}" in r.stdout, (cmd, r.stderr[-2000:])


def test_a_broken_benchmark_install_is_not_reported_as_missing() -> None:
    """A module missing inside the package (a bench's own import failing) is a real error, not 'not installed'."""
    r = sr3d("bench", "--help", hide=("loadtests.bench_peer",))
    assert r.returncode == 1 and NO_BENCH not in r.stderr
    assert "bench_peer" in r.stderr.splitlines()[-1]
