"""Score the results file with the benchmark's metrics; write report.json and report.png.

Scoring reads only results.jsonl, so a run can be re-scored (another judge, a fixed parser)
without asking the model again.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.eval import metrics

REPORT_JSON = "report.json"
REPORT_PNG = "report.png"


def score(fmt: str, rows: Mapping[str, Mapping[str, Any]],
          judges: metrics.SpatialRGPTJudges = metrics.SpatialRGPTJudges()) -> dict[str, Any]:
    ordered = [rows[k] for k in sorted(rows, key=_id_key)]
    errors = sum(1 for r in ordered if r.get("error"))
    if fmt == "vsibench":
        table = metrics.vsi_aggregate(
            (r["category"], metrics.vsi_item_score(r["category"], r["prediction"], r["ground_truth"])) for r in ordered
        )
        overall = {"overall": table.pop("overall")}
    elif fmt == "spatialrgpt":
        table = metrics.srgpt_aggregate(
            metrics.srgpt_item_score(r["qa_type"], r["category"], r.get("judge_question", r["question"]),
                                     r["ground_truth"], r["prediction"], judges) for r in ordered
        )
        overall = table.pop("overall")
    else:
        raise ValueError(fmt)
    return {"format": fmt, "overall": overall, **table, "request_errors": errors}


def _id_key(k: str) -> tuple[int, Any]:
    return (0, int(k)) if k.isdigit() else (1, k)


def _finite(obj: Any) -> Any:
    """JSON has no NaN: a category without any matched item reports null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    return obj


def write(report: dict[str, Any], out_dir: Path, title: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_JSON).write_text(json.dumps(_finite(report), indent=2) + "\n")
    return [out_dir / REPORT_JSON, plot(report, out_dir / REPORT_PNG, title)]


def plot(report: dict[str, Any], path: Path, title: str) -> Path:
    import matplotlib  # optional (pip install '.[eval]'): imported only when a chart is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = report["categories"]
    names = list(cats) + [f"overall ({k})" if k != "overall" else "overall" for k in report["overall"]]
    values = [cats[c]["score"] for c in cats] + list(report["overall"].values())
    labels = [f"{cats[c]['metric']}, n={cats[c]['n']}" for c in cats] + [""] * len(report["overall"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(names) + 2), 4.5))
    bars = ax.bar(range(len(names)), values, color=["C0"] * len(cats) + ["C3"] * len(report["overall"]))
    for bar, value, label in zip(bars, values, labels):
        ax.annotate(f"{value:.1f}\n{label}".strip(), (bar.get_x() + bar.get_width() / 2, value), ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel("score (%): accuracy / MRA / success")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def text_table(report: dict[str, Any]) -> str:
    lines = [f"{'category':<28} {'metric':<9} {'n':>5} {'score':>7}"]
    for name, row in report["categories"].items():
        extra = ""
        if row.get("abs_rel") is not None and not (isinstance(row["abs_rel"], float) and math.isnan(row["abs_rel"])):
            extra = f"  abs_rel {row['abs_rel']:.3f}"
        if row.get("error_degrees") is not None and not math.isnan(row["error_degrees"]):
            extra = f"  error {row['error_degrees']:.1f} deg"
        lines.append(f"{name:<28} {row['metric']:<9} {row['n']:>5} {row['score']:>7.2f}{extra}")
    for name, value in report["overall"].items():
        n = report.get("n_by_kind", {}).get(name, report["n"])
        lines.append(f"{('overall ' + name) if name != 'overall' else 'overall':<28} {'':<9} {n:>5} {value:>7.2f}")
    if "match_fail_count" in report:
        lines.append(f"match failures (judge could not read an answer): {report['match_fail_count']}")
    return "\n".join(lines)
