"""Score the results file with the benchmark's metrics; write report.json and report.png.

Scoring reads only results.jsonl, so a run can be re-scored (another judge, a fixed parser)
without asking the model again.

A `spatialrgpt` results file may hold VSI-Bench-style rows (`benchmark: "vsibench"`, the project's
measurement set): those are scored with VSI-Bench's MRA and reported beside the SpatialRGPT groups
(kind `vsibench`, overall key `vsibench`). Every `spatialrgpt` report also carries
`relative_error`: the median of |pred - gt| / gt over the distance and size items (see
`relative_errors`), the number the issue's "median relative error <= 3 %" target is about.
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
        srgpt = [r for r in ordered if r.get("benchmark", "spatialrgpt") != "vsibench"]
        vsi = [r for r in ordered if r.get("benchmark") == "vsibench"]
        table = metrics.srgpt_aggregate(
            metrics.srgpt_item_score(r["qa_type"], r["category"], r.get("judge_question", r["question"]),
                                     r["ground_truth"], r["prediction"], judges) for r in srgpt
        )
        overall = table.pop("overall")
        if vsi:  # the measurement set's VSI-Bench-style items: their own metric, beside the bench's groups
            vsi_table = metrics.vsi_aggregate(
                (r["category"], metrics.vsi_item_score(r["category"], r["prediction"], r["ground_truth"])) for r in vsi)
            for name, row in vsi_table["categories"].items():
                table["categories"][name] = {"kind": "vsibench", **row}
            overall["vsibench"] = vsi_table["overall"]
            table["n_by_kind"]["vsibench"] = vsi_table["n"]
            table["n"] += vsi_table["n"]
        table["relative_error"] = relative_errors(ordered, judges)
    else:
        raise ValueError(fmt)
    return {"format": fmt, "overall": overall, **table, "request_errors": errors}


# Which categories are lengths, and whether each is a distance or a size (for `relative_error`).
LENGTH_GROUPS = {
    "distance_data": "distances", "horizontal_distance_data": "distances", "vertical_distance_data": "distances",
    "object_abs_distance": "distances",
    "width_data": "sizes", "height_data": "sizes", "object_size_estimation": "sizes",
}


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def relative_errors(rows: list[Mapping[str, Any]],
                    judges: metrics.SpatialRGPTJudges = metrics.SpatialRGPTJudges()) -> dict[str, Any]:
    """Median |pred - gt| / gt over the length items (SpatialRGPT distances, width, height; VSI-Bench
    absolute distance and object size), overall, per group (distances / sizes) and per category.

    Answers are read the way each benchmark's scorer reads them: SpatialRGPT rows through the judge's
    length conversion (metres), VSI-Bench rows as the first word's number (their `fuzzy_matching`),
    so the ratio is unit-free. Rows with no readable number are counted in `unparsed`, not in the
    medians (they already score 0 in the success rates)."""
    per_cat: dict[str, list[float]] = {}
    unparsed = 0
    for r in rows:
        group = LENGTH_GROUPS.get(r["category"])
        if group is None:
            continue
        if r.get("benchmark") == "vsibench":
            gt, pred = metrics.to_float(r["ground_truth"]), metrics.to_float(metrics.vsi_answer(r["prediction"]))
        else:
            gt, pred = judges.length_m(r["ground_truth"]), judges.length_m(r["prediction"]) if r["prediction"] else None
        if gt is None or gt <= 0 or pred is None:
            unparsed += 1
            continue
        per_cat.setdefault(r["category"], []).append(abs(pred - gt) / gt)
    groups: dict[str, list[float]] = {}
    for cat, errs in per_cat.items():
        groups.setdefault(LENGTH_GROUPS[cat], []).extend(errs)
    every = [e for errs in per_cat.values() for e in errs]
    return {
        "definition": "median of |pred - gt| / gt over distance and size items with a readable answer",
        "median": _median(every), "n": len(every), "unparsed": unparsed,
        "groups": {g: {"median": _median(v), "n": len(v)} for g, v in sorted(groups.items())},
        "categories": {c: {"median": _median(v), "n": len(v)} for c, v in sorted(per_cat.items())},
    }


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
    rel = report.get("relative_error")
    if rel and rel.get("median") is not None:
        parts = ", ".join(f"{g} {v['median'] * 100:.2f} % (n={v['n']})" for g, v in rel["groups"].items()
                          if v["median"] is not None)
        lines.append(f"median relative error of lengths: {rel['median'] * 100:.2f} % (n={rel['n']}, "
                     f"unparsed {rel['unparsed']}); {parts}")
    if "answer_mode" in report or "scenes_sent" in report:
        lines.append(f"answer mode: {report.get('answer_mode')}; RGB-D scenes sent: {report.get('scenes_sent')}")
    if report.get("relative_scale_note"):
        lines.append("note: " + report["relative_scale_note"])
    return "\n".join(lines)
