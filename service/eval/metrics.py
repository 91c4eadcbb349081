"""Benchmark metrics as pure functions: no service, HTTP or model imports, only the standard library.

Each function re-states, in our own code, what the benchmark's published evaluation code computes,
so that `sr3d eval` numbers are comparable with the papers'. tests/test_eval_metrics.py checks them
against numbers produced by the official code itself (provenance in that test's docstring).

VSI-Bench (vision-x-nyu/thinking-in-space, lmms_eval/tasks/vsibench/utils.py):
- the answer is the text before the first space, with trailing "." stripped (their `fuzzy_matching`);
- multiple choice: case-insensitive exact match with the option letter;
- numeric: mean relative accuracy (MRA) over thresholds 0.50, 0.55, ..., 0.95:
  mean over θ of 1[|ŷ − y| / y ≤ 1 − θ]; an answer that does not parse as a float scores 0;
- the three object_rel_direction_{easy,medium,hard} accuracies are averaged into one category
  (a subset holding only some levels averages those; their code stops with a KeyError there),
  and "overall" is the unweighted mean of the per-category scores (×100).

SpatialRGPT-Bench (AnjieCheng/SpatialRGPT, scripts/srgpt/eval/evaluate_spatial_with_gpt4.py):
- distances/sizes: both answers converted to metres; success if 0.75·gt ≤ pred ≤ 1.25·gt;
  error = |pred − gt| / (gt + 1e-4); abs_rel = |gt − pred| / gt (their `compute_errors`);
- direction: clock hours of answer and response; success if the circular difference ≤ 1 hour;
- qualitative: a 0/1 mark per item, grouped into their six predicate pairs.
Their conversions (units → metres, sentence → clock hour, qualitative 0/1) are done by a GPT-4
judge. We cannot call GPT-4, so the default judges here are deterministic rules, documented on
each function; `SpatialRGPTJudges` lets a caller substitute any other judge (an LLM, a human table).
An item whose judge returns None counts as a "match failure" exactly as the official code counts a
judge exception: success 0, excluded from the error averages, counted in `match_fail_count`.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------------------------------------
# VSI-Bench

VSI_MC_TYPES = (
    "object_rel_direction_easy",
    "object_rel_direction_medium",
    "object_rel_direction_hard",
    "object_rel_distance",
    "route_planning",
    "obj_appearance_order",
)
VSI_NUMERIC_TYPES = ("object_abs_distance", "object_counting", "object_size_estimation", "room_size_estimation")
# Report order of the paper's table (their aggregate's order).
VSI_CATEGORY_ORDER = (
    "object_counting",
    "object_abs_distance",
    "object_size_estimation",
    "room_size_estimation",
    "object_rel_distance",
    "object_rel_direction",
    "route_planning",
    "obj_appearance_order",
)
# 0.50 .. 0.95 built the way numpy.linspace(.5, .95, 10) builds them (start + i·step, last = end), so
# that a relative error exactly on a threshold compares the same as in their numpy code.
MRA_THRESHOLDS = tuple([0.5 + i * ((0.95 - 0.5) / 9) for i in range(9)] + [0.95])

# Their prompt pieces (vsibench.yaml `default` kwargs, and utils.py's fallback pre-prompt), verbatim.
VSI_PRE_PROMPT = "These are frames of a video."
VSI_MC_POST_PROMPT = "Answer with the option's letter from the given choices directly."
VSI_NUMERIC_POST_PROMPT = "Please answer the question using a single word or phrase."
VSI_MAX_NEW_TOKENS = 16  # vsibench.yaml generation_kwargs: greedy, max_new_tokens 16


def vsi_prompt(question_type: str, question: str, options: Sequence[str] | None) -> str:
    """The text VSI-Bench sends with the frames (their `vsibench_doc_to_text`)."""
    if question_type in VSI_NUMERIC_TYPES:
        return VSI_PRE_PROMPT + "\n" + question + "\n" + VSI_NUMERIC_POST_PROMPT
    if question_type in VSI_MC_TYPES:
        return "\n".join([VSI_PRE_PROMPT, question, "Options:\n" + "\n".join(options or []), VSI_MC_POST_PROMPT])
    raise ValueError(f"unknown VSI-Bench question_type {question_type!r}")


def vsi_answer(prediction: str) -> str:
    """First space-separated word, trailing periods stripped (split on ' ' exactly as they do)."""
    return prediction.split(" ")[0].rstrip(".").strip()


def to_float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def mean_relative_accuracy(pred: float, target: float, thresholds: Sequence[float] = MRA_THRESHOLDS) -> float:
    rel = abs(pred - target) / target
    return sum(1.0 for t in thresholds if rel <= 1 - t) / len(thresholds)


def vsi_item_score(question_type: str, prediction: str, ground_truth: str) -> float:
    """Accuracy (0/1) for multiple choice, MRA in [0, 1] for numbers; unparsable → 0."""
    answer = vsi_answer(prediction)
    if question_type in VSI_MC_TYPES:
        return 1.0 if answer.lower() == str(ground_truth).lower() else 0.0
    if question_type in VSI_NUMERIC_TYPES:
        pred, target = to_float(answer), to_float(ground_truth)
        if pred is None or target is None:
            return 0.0
        return mean_relative_accuracy(pred, target)
    raise ValueError(f"unknown VSI-Bench question_type {question_type!r}")


def vsi_metric_name(question_type: str) -> str:
    return "accuracy" if question_type in VSI_MC_TYPES or question_type == "object_rel_direction" else "MRA"


def vsi_aggregate(rows: Iterable[tuple[str, float]]) -> dict[str, Any]:
    """(question_type, item score) pairs → per-category means and overall, in percent.

    Their order of operations: mean per question type; the three rel-direction levels averaged
    (unweighted) into `object_rel_direction` when all three are present; overall = mean of categories.
    """
    by_type: dict[str, list[float]] = defaultdict(list)
    for qtype, score in rows:
        by_type[qtype].append(score)
    per_type = {t: sum(v) / len(v) for t, v in by_type.items()}
    levels = [k for k in (f"object_rel_direction_{lvl}" for lvl in ("easy", "medium", "hard")) if k in per_type]
    if levels:  # theirs needs all three (KeyError otherwise); a --limit subset may hold fewer: mean of those
        per_type["object_rel_direction"] = sum(per_type.pop(k) for k in levels) / len(levels)
    overall = sum(per_type.values()) / len(per_type) if per_type else 0.0
    categories = {}
    for cat in (*VSI_CATEGORY_ORDER, *sorted(set(per_type) - set(VSI_CATEGORY_ORDER))):
        if cat in per_type:
            categories[cat] = {"metric": vsi_metric_name(cat), "score": per_type[cat] * 100.0,
                               "n": _count(by_type, cat)}
    return {"overall": overall * 100.0, "categories": categories, "n": sum(len(v) for v in by_type.values())}


def _count(by_type: Mapping[str, list[float]], cat: str) -> int:
    if cat == "object_rel_direction":
        return sum(len(by_type.get(f"object_rel_direction_{lvl}", [])) for lvl in ("easy", "medium", "hard"))
    return len(by_type.get(cat, []))


# ---------------------------------------------------------------------------------------------
# SpatialRGPT-Bench

SRGPT_DISTANCE_CATEGORIES = {  # their qa_info.category → their report name
    "distance_data": "direct_distance",
    "horizontal_distance_data": "horizontal_distance",
    "vertical_distance_data": "vertical_distance",
    "width_data": "width",
    "height_data": "height",
}
SRGPT_DIRECTION = "direction"
SRGPT_MAX_NEW_TOKENS = 128  # llava/eval/eval_spatial.py: greedy (temperature 0), max_new_tokens 128

# Metres per unit. Their judge prompt states inch, foot and centimetre factors; the rest are SI.
_UNITS_M = {
    "km": 1000.0, "kilometer": 1000.0, "kilometre": 1000.0,
    "m": 1.0, "meter": 1.0, "metre": 1.0,
    "cm": 0.01, "centimeter": 0.01, "centimetre": 0.01,
    "mm": 0.001, "millimeter": 0.001, "millimetre": 0.001,
    "in": 0.0254, "inch": 0.0254, "inches": 0.0254, '"': 0.0254, "″": 0.0254,
    "ft": 0.3048, "foot": 0.3048, "feet": 0.3048, "'": 0.3048, "′": 0.3048,
    "yd": 0.9144, "yard": 0.9144,
}
_NUM = r"(\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)"
_UNIT_ALT = "|".join(sorted((re.escape(u) for u in _UNITS_M), key=len, reverse=True))
_QUANTITY = re.compile(_NUM + r"\s*(" + _UNIT_ALT + r")(?:e?s)?(?![a-z])", re.IGNORECASE)
_REGION_NAME = re.compile(r"region\s*\[\s*\d+\s*\]|<region\d+>", re.IGNORECASE)
_FEET_INCHES = re.compile(_NUM + r"\s*(?:ft|foot|feet|')\s*(?:and\s*)?" + _NUM + r"\s*(?:in|inch|inches|\")(?![a-z])",
                          re.IGNORECASE)


def parse_length_m(text: str) -> float | None:
    """Deterministic stand-in for their GPT unit conversion: the first length in `text`, in metres.

    Understands "1.2 meters", "30 cm", "3 feet", "10.5 inches", "5 ft 3 in", "2'", "1,200 mm".
    A bare number without a unit is read as metres (SpatialRGPT-Bench asks for metric answers and
    models usually say "2.1 meters"; a bare number is ambiguous and metres is the benchmark's unit).
    Region names ("Region [0]", "<region1>") are not numbers: they are removed first, so "Region [0]
    is 0.19 relative units wide" reads 0.19, not the region's index (a judge reading the sentence
    would not take the index for a length either).
    Returns None when there is no number at all: that item is a match failure.
    """
    text = _REGION_NAME.sub(" ", text)
    m = _FEET_INCHES.search(text)
    if m:
        return float(m.group(1).replace(",", "")) * 0.3048 + float(m.group(2).replace(",", "")) * 0.0254
    m = _QUANTITY.search(text)
    if m:
        return float(m.group(1).replace(",", "")) * _UNITS_M[m.group(2).lower()]
    bare = re.search(_NUM, text)
    return float(bare.group(1).replace(",", "")) if bare else None


_CLOCK = re.compile(r"(\d{1,2})\s*o'?\s*clock", re.IGNORECASE)


def parse_clock(text: str) -> int | None:
    """Deterministic stand-in for their GPT direction reader: the first "K o'clock" in the text."""
    m = _CLOCK.search(text)
    if m and 1 <= int(m.group(1)) <= 12:
        return int(m.group(1))
    return None


def distance_success(pred_m: float, gt_m: float) -> bool:
    return 0.75 * gt_m <= pred_m <= 1.25 * gt_m


def distance_error(pred_m: float, gt_m: float) -> float:
    return abs(pred_m - gt_m) / (gt_m + 1e-4)


def abs_rel(pred_m: float, gt_m: float) -> float:
    return abs(gt_m - pred_m) / gt_m


def clock_error(pred_h: int, gt_h: int) -> int:
    diff = abs(gt_h - pred_h)
    return min(diff, 12 - diff)


_NEGATIVE = re.compile(r"\b(no|not|incorrect|isn't|aren't|doesn't|wrong|false|nope)\b|n't\b", re.IGNORECASE)
# "right" is not here: in left/right questions it is a direction, not an affirmation.
_POSITIVE = re.compile(r"\b(yes|correct|indeed|true|yeah|yep|affirmative)\b", re.IGNORECASE)
_REGION = re.compile(r"region\s*\[?\s*(\d+)\s*\]?|<region(\d+)>", re.IGNORECASE)


def _polarity(text: str) -> bool | None:
    """True for an affirmative answer, False for a negative one, None when it says neither."""
    first = re.split(r"[.,;!]", text.strip(), maxsplit=1)[0]
    for chunk in (first, text):  # the opening words decide ("Yes, ..."), else the whole sentence
        if _NEGATIVE.search(chunk):
            return False
        if _POSITIVE.search(chunk):
            return True
    return None


def _first_region(text: str) -> int | None:
    m = _REGION.search(text)
    return int(m.group(1) or m.group(2)) if m else None


def rule_qualitative_judge(question: str, answer: str, response: str, category: str) -> int | None:
    """Default, deterministic qualitative judge (theirs is GPT-4 with few-shot examples).

    `*_predicate` items are yes/no: the mark is 1 when the response has the answer's polarity
    (yes/correct/indeed vs no/not/incorrect). `*_choice` items name a region: the mark is 1 when the
    response names the same region first. None (a match failure) when the response has neither.
    """
    if "choice" in category:
        want, got = _first_region(answer), _first_region(response)
    else:
        want, got = _polarity(answer), _polarity(response)
    if got is None or want is None:
        return None
    return int(want == got)


@dataclass(frozen=True)
class SpatialRGPTJudges:
    """The three conversions their GPT-4 judge performs; swap any of them for another judge."""

    length_m: Callable[[str], float | None] = parse_length_m
    clock: Callable[[str], int | None] = parse_clock
    qualitative: Callable[[str, str, str, str], int | None] = rule_qualitative_judge


def srgpt_qual_group(category: str) -> str:
    """Their grouping of qualitative categories, in their order of tests (first match wins)."""
    for keys, group in ((("short", "tall"), "tall/short"), (("left", "right"), "left/right"),
                        (("below", "above"), "below/above"), (("behind", "front"), "behind/front"),
                        (("big", "small"), "big/small"), (("wide", "thin"), "wide/thin")):
        if any(k in category for k in keys):
            return group
    raise ValueError(f"{category} not found")


def srgpt_item_score(qa_type: str, category: str, question: str, gt: str, pred: str,
                     judges: SpatialRGPTJudges = SpatialRGPTJudges()) -> dict[str, Any]:
    """One item's judgement: {"group", "kind", "success", "error"?, "abs_rel"?, "matched", parsed values}."""
    if qa_type == "quantitative":
        if category == SRGPT_DIRECTION:
            gt_h, pred_h = judges.clock(gt), judges.clock(pred)
            out: dict[str, Any] = {"group": "direction", "kind": "quantitative", "gt_value": gt_h, "pred_value": pred_h}
            if gt_h is None or pred_h is None:
                return {**out, "matched": False, "success": 0}
            err = clock_error(pred_h, gt_h)
            return {**out, "matched": True, "success": int(err <= 1), "error": float(err)}
        if category not in SRGPT_DISTANCE_CATEGORIES:
            raise ValueError(f"unknown quantitative category {category!r}")
        gt_m, pred_m = judges.length_m(gt), judges.length_m(pred)
        out = {"group": SRGPT_DISTANCE_CATEGORIES[category], "kind": "quantitative", "gt_value": gt_m,
               "pred_value": pred_m}
        if gt_m is None or pred_m is None:
            return {**out, "matched": False, "success": 0}
        out.update(matched=True, success=int(distance_success(pred_m, gt_m)), error=distance_error(pred_m, gt_m))
        if gt_m > 0:  # their compute_errors divides by gt (numpy: inf, no exception, for gt 0); ours skips it
            out["abs_rel"] = abs_rel(pred_m, gt_m)
        return out
    if qa_type == "qualitative":
        mark = judges.qualitative(question, gt, pred, category)
        # Theirs: a failed judge still appends int(mark > 0) with mark 0 → counts as wrong.
        return {"group": srgpt_qual_group(category), "kind": "qualitative", "matched": mark is not None,
                "success": int((mark or 0) > 0)}
    raise ValueError(f"unknown qa type {qa_type!r}")


def srgpt_aggregate(scores: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-group success rates (%), error means, abs_rel, overall qualitative/quantitative accuracy.

    Mirrors their aggregation: success rate over all items of a group (match failures count as 0);
    error mean over matched items only (×100 as their `Quan_*_err`; direction error in degrees =
    mean hours × 30); abs_rel mean over matched items (rounded to 3 decimals only when printed);
    overall = pooled successes / pooled items per kind.
    """
    success: dict[str, list[int]] = defaultdict(list)
    errors: dict[str, list[float]] = defaultdict(list)
    rels: dict[str, list[float]] = defaultdict(list)
    kinds: dict[str, str] = {}
    fails = 0
    for s in scores:
        g = s["group"]
        kinds[g] = s["kind"]
        success[g].append(int(s["success"]))
        fails += 0 if s["matched"] else 1
        if "error" in s:
            errors[g].append(float(s["error"]))
        if "abs_rel" in s:
            rels[g].append(float(s["abs_rel"]))
    categories: dict[str, dict[str, Any]] = {}
    for g in success:
        row: dict[str, Any] = {"kind": kinds[g], "metric": "success", "score": 100.0 * sum(success[g]) / len(success[g]),
                               "n": len(success[g])}
        if kinds[g] == "quantitative":
            row["error"] = 100.0 * sum(errors[g]) / len(errors[g]) if errors[g] else math.nan
            if g == SRGPT_DIRECTION:
                row["error_degrees"] = row["error"] / 100 * 360 / 12
            else:
                row["abs_rel"] = sum(rels[g]) / len(rels[g]) if rels[g] else math.nan
        categories[g] = row
    overall: dict[str, float] = {}
    n_by_kind: dict[str, int] = {}
    for kind in ("qualitative", "quantitative"):
        pooled = [v for g, vs in success.items() if kinds[g] == kind for v in vs]
        if pooled:
            overall[kind] = 100.0 * sum(pooled) / len(pooled)
            n_by_kind[kind] = len(pooled)
    return {"overall": overall, "categories": categories, "match_fail_count": fails, "n_by_kind": n_by_kind,
            "n": sum(len(v) for v in success.values())}
