"""`service/eval/metrics.py` against numbers computed by the benchmarks' OWN published code.

tests/data/eval_reference.json holds our fixed predictions and the official code's numbers only
(no third-party code is in this repository). How the numbers were made, in a throwaway venv outside
the repo (Python 3.11; numpy 2.4.6, pandas 3.1.1, pyyaml, loguru, tqdm, pycocotools 2.0.11):

- VSI-Bench: github.com/vision-x-nyu/thinking-in-space at commit
  51e089c3ae69b9435e9489058610f5b3964c56a8, `lmms_eval/tasks/vsibench/utils.py` imported as is
  (its only unused import, `datasets`, stubbed with an empty `Dataset` class). For each fixed
  (question_type, ground_truth, prediction): `vsibench_process_results({...}, [prediction])`; the
  per-item "accuracy" / "MRA:.5:.95:.05" is stored as `score`. Then
  `vsibench_aggregate_results(all docs)`; its dict minus the `tabulated_*` strings is `aggregate`.
- SpatialRGPT-Bench: github.com/AnjieCheng/SpatialRGPT at commit
  16715d4f1419997da18926c6ce574802d1eb3a37, `scripts/srgpt/eval/evaluate_spatial_with_gpt4.py`
  run as a script (from the repo root, so it finds its prompt templates) on a jsonl of the fixed
  items, with its `openai` module replaced by a stub that answers each judge prompt with the item's
  `judge` value (metres / clock hours / 0-1 mark; null = the stub raises, i.e. a judge failure).
  The script's own score.json is stored as `score`.
- COCO RLE: pycocotools `mask.encode` of the mask described in `mask_rule` (the decoder that
  SpatialRGPT's `llava/eval/eval_spatial.py` uses for the bench's `rle` field), with `area`/`toBbox`.

So the SpatialRGPT comparison checks two things separately: our deterministic judges produce the
conversions a correct GPT judge would (the `judge` values), and our aggregation of those gives
their score.json.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from service.eval import metrics
from service.eval.datasets import decode_coco_rle, srgpt_question

REF = json.loads((Path(__file__).parent / "data" / "eval_reference.json").read_text())


def test_mra_thresholds_are_their_linspace() -> None:
    assert np.array_equal(np.array(metrics.MRA_THRESHOLDS), np.linspace(0.5, 0.95, int((0.95 - 0.5) / 0.05 + 2)))


@pytest.mark.parametrize("item", REF["vsibench"]["items"], ids=lambda it: f"{it['question_type']}:{it['prediction']!r}")
def test_vsibench_item_scores_match_official(item: dict) -> None:
    got = metrics.vsi_item_score(item["question_type"], item["prediction"], item["ground_truth"])
    assert got == pytest.approx(item["score"], abs=1e-12)


def test_vsibench_aggregate_matches_official() -> None:
    items = REF["vsibench"]["items"]
    ours = metrics.vsi_aggregate((it["question_type"], metrics.vsi_item_score(it["question_type"], it["prediction"],
                                                                              it["ground_truth"])) for it in items)
    theirs = REF["vsibench"]["aggregate"]
    assert ours["overall"] == pytest.approx(theirs["overall"], abs=1e-9)
    for cat, row in ours["categories"].items():
        key = f"{cat}_accuracy" if row["metric"] == "accuracy" else f"{cat}_MRA:.5:.95:.05"
        assert row["score"] == pytest.approx(theirs[key], abs=1e-9), cat
    assert len(ours["categories"]) == len(theirs) - 1  # every category of theirs, plus their "overall"
    assert ours["n"] == len(items)


def test_vsibench_prompt_is_their_doc_to_text() -> None:
    mc = metrics.vsi_prompt("route_planning", "Q?", ["A. left", "B. right"])
    assert mc == ("These are frames of a video.\nQ?\nOptions:\nA. left\nB. right\n"
                  "Answer with the option's letter from the given choices directly.")
    num = metrics.vsi_prompt("object_counting", "How many chairs?", None)
    assert num == "These are frames of a video.\nHow many chairs?\nPlease answer the question using a single word or phrase."
    with pytest.raises(ValueError):
        metrics.vsi_prompt("nonsense", "Q", None)


SRGPT = REF["spatialrgpt"]


@pytest.mark.parametrize("item", SRGPT["items"], ids=lambda it: f"{it['category']}:{it['pred']!r}")
def test_srgpt_default_judges_give_the_reference_conversions(item: dict) -> None:
    judges = metrics.SpatialRGPTJudges()
    if item["qa_type"] == "qualitative":
        assert judges.qualitative(item["question"], item["gt"], item["pred"], item["category"]) == item["judge"]
    elif item["category"] == "direction":
        got = (judges.clock(item["gt"]), judges.clock(item["pred"]))
        assert got == (tuple(item["judge"]) if item["judge"] else (got[0], None))
    else:
        gt, pred = judges.length_m(item["gt"]), judges.length_m(item["pred"])
        if item["judge"] is None:
            assert gt is not None and pred is None
        else:
            assert (gt, pred) == pytest.approx(tuple(item["judge"]), abs=1e-9)


def test_srgpt_aggregate_matches_official_score_json() -> None:
    ours = metrics.srgpt_aggregate(metrics.srgpt_item_score(it["qa_type"], it["category"], it["question"], it["gt"],
                                                            it["pred"]) for it in SRGPT["items"])
    theirs = SRGPT["score"]
    for group, row in ours["categories"].items():
        if row["kind"] == "qualitative":
            assert row["score"] == pytest.approx(theirs[f"Qual_{group}_acc"], abs=1e-9), group
            continue
        assert row["score"] == pytest.approx(theirs[f"Quan_{group}_acc"], abs=1e-9), group
        assert row["error"] == pytest.approx(theirs[f"Quan_{group}_err"], abs=1e-9), group
        if group != "direction":
            category = {v: k for k, v in metrics.SRGPT_DISTANCE_CATEGORIES.items()}[group]
            assert round(row["abs_rel"], 3) == pytest.approx(theirs[f"Quan_{category}_absrel"], abs=1e-12), group
    assert ours["overall"]["qualitative"] == pytest.approx(theirs["Qual_overall_acc"], abs=1e-9)
    assert ours["overall"]["quantitative"] == pytest.approx(theirs["Quan_overall_acc"], abs=1e-9)
    assert ours["match_fail_count"] == theirs["Match_fail_count"]
    theirs_groups = {k[len("Qual_"):-len("_acc")] for k in theirs if k.startswith("Qual_") and k != "Qual_overall_acc"}
    theirs_groups |= {k[len("Quan_"):-len("_acc")] for k in theirs if k.endswith("_acc") and k.startswith("Quan_")
                      and k != "Quan_overall_acc"}
    assert set(ours["categories"]) == theirs_groups


@pytest.mark.parametrize(("text", "metres"), [
    ("1.2 meters", 1.2), ("It is 30 cm tall.", 0.3), ("3 feet", 0.9144), ("10 inches", 0.254), ("about 2 m", 2.0),
    ("5 ft 3 in", 5 * 0.3048 + 3 * 0.0254), ("1,200 mm", 1.2), ("2.5", 2.5), ("6'", 6 * 0.3048), ("1 foot", 0.3048),
    ("1.5 metres apart", 1.5), ("no idea", None), ("", None),
])
def test_length_parser(text: str, metres: float | None) -> None:
    got = metrics.parse_length_m(text)
    assert got == (pytest.approx(metres) if metres is not None else None)


def test_qualitative_rule_judge_none_when_response_says_nothing() -> None:
    assert metrics.rule_qualitative_judge("Is Region [0] left of Region [1]?", "Yes.", "The sky is blue", "left_predicate") is None
    assert metrics.rule_qualitative_judge("Which is taller?", "Region [1] is taller.", "Both", "tall_choice") is None
    s = metrics.srgpt_item_score("qualitative", "left_predicate", "q", "Yes.", "The sky is blue")
    assert s == {"group": "left/right", "kind": "qualitative", "matched": False, "success": 0}


def test_coco_rle_decoder_matches_pycocotools_encoding() -> None:
    rle = REF["coco_rle"]
    h, w = rle["size"]
    yy, xx = np.mgrid[:h, :w]
    expected = (((xx - 20) ** 2 + (yy - 15) ** 2 < 120) | ((xx > 40) & (yy > 25))).astype(np.uint8)
    mask = decode_coco_rle({"size": rle["size"], "counts": rle["counts"]})
    assert mask.shape == (h, w) and np.array_equal(mask, expected) and int(mask.sum()) == rle["area"]
    ys, xs = np.nonzero(mask)
    assert [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] == rle["bbox"]
    # the uncompressed form (a list of run lengths) decodes to the same mask
    flat = expected.T.reshape(-1)
    runs, value, n = [], 0, 0
    for v in flat:
        if v != value:
            runs.append(n)
            value, n = v, 0
        n += 1
    runs.append(n)
    assert np.array_equal(decode_coco_rle({"size": [h, w], "counts": runs}), expected)


def test_srgpt_question_conversion() -> None:
    assert srgpt_question("<image>\nIs <mask> <depth> behind <mask> <depth>?") == "Is <region0> behind <region1>?"
    assert srgpt_question("<image>\nHow tall is <mask>?") == "How tall is <region0>?"
    assert srgpt_question("Is Region [1] left of Region [0]?") == "Is <region1> left of <region0>?"


def test_unparsable_numbers_score_zero_and_nan_is_not_a_score() -> None:
    assert metrics.vsi_item_score("object_counting", "many", "3") == 0.0
    assert metrics.vsi_item_score("object_counting", "nan", "3") == 0.0
    assert not math.isnan(metrics.vsi_item_score("object_counting", "inf", "3"))
