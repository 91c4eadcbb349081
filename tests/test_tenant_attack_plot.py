"""`loadtests/tenant_attack_plot.py`: the tenant_attack tool's figures, from the committed 16-CPU results."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from loadtests.tenant_attack_plot import run_figure

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "loadtests" / "results" / "tenant_attack_16cpu"


def test_one_runs_figure_is_a_png(tmp_path: Path) -> None:
    result = json.loads((RUNS / "after_flood_1.json").read_text())
    path = run_figure(result, tmp_path / "run.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 800 and im.height > 300


def test_the_cli_compares_runs_and_prints_their_ratios(tmp_path: Path) -> None:
    runs = sorted(RUNS.glob("*.json"))
    assert len(runs) >= 2
    out = tmp_path / "ratios.png"
    done = subprocess.run([sys.executable, "-m", "loadtests.tenant_attack_plot", *map(str, runs), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    printed = json.loads(done.stdout.splitlines()[0])
    assert printed == {p.stem: json.loads(p.read_text())["keyB_p99_ratio"] for p in runs}
    with Image.open(out) as im:
        assert im.format == "PNG"
