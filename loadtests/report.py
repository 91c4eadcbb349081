"""Turn what the clients saw into numbers (JSON) and one figure (PNG, matplotlib Agg).

Latencies are the client's: from just before the POST to the arrival of the event (TTFT = first
`token`, e2e = the terminal event). Goodput is the share of requests that ended as their scenario
expects AND met every SLO (cancels are excluded from the latency SLOs: they end early on purpose).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtests.scenarios import Outcome


@dataclass
class SLO:
    ttft_s: float = 5.0
    itl_s: float = 0.5  # per-request p90 of inter-token gaps
    e2e_s: float = 20.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no data."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def dist(values: Sequence[float]) -> dict[str, float | int | None]:
    r = lambda v: None if v is None else round(v, 4)  # noqa: E731 - tiny local formatter
    return {"n": len(values), "mean": r(sum(values) / len(values)) if values else None,
            "p50": r(percentile(values, 50)), "p90": r(percentile(values, 90)), "p99": r(percentile(values, 99)),
            "max": r(max(values)) if values else None}


def meets_slo(o: Outcome, slo: SLO) -> bool:
    if not o.expected:
        return False
    if o.scenario == "cancel":
        return True
    res = o.result
    itl90 = percentile(res.itls, 90)
    return (res.ttft is not None and res.ttft <= slo.ttft_s and res.e2e is not None and res.e2e <= slo.e2e_s
            and (itl90 is None or itl90 <= slo.itl_s))


def summarize(outcomes: Sequence[Outcome], duration_s: float, slo: SLO, label: str = "") -> dict[str, Any]:
    """One load level -> the numbers a capacity decision needs."""
    timed = [o for o in outcomes if o.scenario != "cancel" and o.expected]
    tokens = sum(sum(1 for e in o.result.events if e.type == "token") for o in outcomes)
    completion = sum(o.result.completion_tokens for o in outcomes)
    finished = [o for o in outcomes if o.result.terminal is not None]
    rejected = Counter(o.result.http_status for o in outcomes if o.result.http_status not in (200, 202, None))
    good = sum(meets_slo(o, slo) for o in outcomes)
    n = len(outcomes)
    by_scenario: dict[str, dict[str, int]] = {}
    for o in outcomes:
        s = by_scenario.setdefault(o.scenario, {"n": 0, "expected": 0})
        s["n"] += 1
        s["expected"] += int(o.expected)
    first_events = [o.result.events[0].t - o.result.t_submit for o in outcomes if o.result.events]
    return {
        "label": label,
        "requests": n,
        "duration_s": round(duration_s, 3),
        "req_per_s": round(len(finished) / duration_s, 4) if duration_s else None,
        "completion_tokens_per_s": round(completion / duration_s, 3) if duration_s else None,
        "token_events_per_s": round(tokens / duration_s, 3) if duration_s else None,
        "error_rate": round(1 - sum(o.expected for o in outcomes) / n, 4) if n else None,
        "goodput": round(good / n, 4) if n else None,
        "goodput_req_per_s": round(good / duration_s, 4) if duration_s else None,
        "rejected_by_status": {str(k): v for k, v in rejected.items()},
        "resumes": sum(o.result.resumes for o in outcomes),
        "ttft_s": dist([o.result.ttft for o in timed if o.result.ttft is not None]),
        "itl_s": dist([x for o in timed for x in o.result.itls]),
        "e2e_s": dist([o.result.e2e for o in timed if o.result.e2e is not None]),
        "first_event_s": dist(first_events),
        "scenarios": by_scenario,
        "problems": sorted({p for o in outcomes for p in o.problems})[:20],
    }


def build_report(levels: list[dict[str, Any]], config: dict[str, Any], slo: SLO) -> dict[str, Any]:
    """Several load levels of one run, with ratios against the first (the within-run comparison)."""
    base = levels[0] if levels else {}
    ratios = []
    for lv in levels[1:]:
        def ratio(key: str, sub: str | None = None) -> float | None:
            a = base.get(key) if sub is None else (base.get(key) or {}).get(sub)
            b = lv.get(key) if sub is None else (lv.get(key) or {}).get(sub)
            return round(b / a, 3) if a and b is not None else None
        ratios.append({"label": f"{lv['label']} vs {base['label']}", "req_per_s": ratio("req_per_s"),
                       "completion_tokens_per_s": ratio("completion_tokens_per_s"),
                       "ttft_p50": ratio("ttft_s", "p50"), "e2e_p50": ratio("e2e_s", "p50")})
    return {"config": config, "slo": asdict(slo), "levels": levels, "ratios": ratios}


def write(report: dict[str, Any], per_level: list[list[Outcome]], out_dir: str | Path, name: str = "service") -> list[Path]:
    """Write <name>.json and <name>.png under out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / f"{name}.json"
    js.write_text(json.dumps(report, indent=2) + "\n")
    png = out / f"{name}.png"
    plot(report, per_level, png)
    return [js, png]


def _cdf(ax: Any, values: Sequence[float], label: str) -> None:
    xs = sorted(values)
    if xs:
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)


def plot(report: dict[str, Any], per_level: list[list[Outcome]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or in CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (a_ttft, a_e2e), (a_itl, a_bar) = axes
    for lv, outs in zip(report["levels"], per_level):
        timed = [o for o in outs if o.scenario != "cancel" and o.expected]
        _cdf(a_ttft, [o.result.ttft for o in timed if o.result.ttft is not None], lv["label"])
        _cdf(a_e2e, [o.result.e2e for o in timed if o.result.e2e is not None], lv["label"])
        itls = [x * 1000 for o in timed for x in o.result.itls]
        if itls:
            a_itl.hist(itls, bins=40, alpha=0.5, label=lv["label"])
    slo = report["slo"]
    a_ttft.axvline(slo["ttft_s"], color="red", ls="--", lw=1, label="SLO")
    a_e2e.axvline(slo["e2e_s"], color="red", ls="--", lw=1, label="SLO")
    a_ttft.set(title="time to first token (CDF)", xlabel="s", ylabel="share of requests")
    a_e2e.set(title="end-to-end latency (CDF)", xlabel="s", ylabel="share of requests")
    a_itl.set(title="inter-token latency", xlabel="ms", ylabel="gaps")
    labels = [lv["label"] for lv in report["levels"]]
    x = range(len(labels))
    a_bar.bar([i - 0.2 for i in x], [lv["req_per_s"] or 0 for lv in report["levels"]], width=0.4, label="req/s")
    a_bar.bar([i + 0.2 for i in x], [lv["goodput_req_per_s"] or 0 for lv in report["levels"]], width=0.4, label="goodput req/s")
    a_bar.set_xticks(list(x), labels)
    a_bar.set(title="throughput per load level")
    for ax in (a_ttft, a_e2e, a_itl, a_bar):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(report["config"].get("title", "sr3d bench service"))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_report(out: str | Path | None, name: str, report: dict[str, Any],
                plot: Callable[[dict[str, Any], Path], None]) -> None:
    """A benchmark's ending: the report as JSON on stdout; with --out DIR also DIR/NAME.json and DIR/NAME.png."""
    print(json.dumps(report, indent=2))
    if out:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        plot(report, d / f"{name}.png")
