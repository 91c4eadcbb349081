"""`sr3d eval` end to end: a small dataset in each benchmark's release layout (written here into
tmp from the repo's clip and its frames), run by the real CLI in a subprocess against a real
`sr3d serve` (embedded Redis, in-process worker, tiny random checkpoint) over loopback HTTP.

VSI-Bench runs against a running service (`--url`) and is interrupted/resumed; SpatialRGPT-Bench
uses `--in-process` (the command starts its own `sr3d serve`). The tiny model answers at chance,
so the tests assert the harness (files, categories, counts, resume), not the scores' values.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from service.eval import metrics
from service.local_stack import serve_stack
from tests.e2e_helpers import BOTTLE_NAME, SERVE_ENV, find_fixture

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]

VSI_ROWS = [  # (question_type, question, options, ground_truth)
    ("object_counting", "How many bottle(s) are in this room?", None, "3"),
    ("object_abs_distance", "What is the distance between the two bottles (in meters)?", None, "0.4"),
    ("object_rel_direction_easy", "Standing by the left bottle facing the right one, is the cup to the left or right?",
     ["A. left", "B. right"], "A"),
    ("object_rel_distance", "Which object is closest to the cup?", ["A. bottle", "B. table", "C. wall", "D. chair"], "B"),
    ("room_size_estimation", "What is the size of this room (in square meters)?", None, "12.5"),
    ("route_planning", "How do you get from the table to the door?", ["A. turn left", "B. turn right"], "B"),
]


def _run_eval(*args: str, env: dict[str, str] | None = None, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **SERVE_ENV, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "service.cli", "eval", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> str:
    with serve_stack(tmp_path_factory.mktemp("serve"), SERVE_ENV) as (_, url):
        yield url


@pytest.fixture
def vsibench_dir(tmp_path: Path) -> Path:
    """The HF release layout: test-00000-of-00001.parquet + {dataset}/{scene_name}.mp4."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "VSI-Bench"
    (root / "scannet").mkdir(parents=True)
    shutil.copy(find_fixture(BOTTLE_NAME), root / "scannet" / "scene0000_00.mp4")
    rows = [{"id": i, "dataset": "scannet", "scene_name": "scene0000_00", "question_type": qt, "question": q,
             "options": opts, "ground_truth": gt} for i, (qt, q, opts, gt) in enumerate(VSI_ROWS)]
    pq.write_table(pa.Table.from_pylist(rows), root / "test-00000-of-00001.parquet")
    return root


def _frame_jpeg(path: Path, index: int) -> tuple[int, int]:
    with av.open(str(find_fixture(BOTTLE_NAME))) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i == index:
                img = frame.to_image()
                break
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=90)
    return img.width, img.height


def _rle_runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts (column-major runs, starting with zeros)."""
    flat = mask.T.reshape(-1)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return runs if flat[0] == 0 else [0, *runs]


@pytest.fixture
def spatialrgpt_dir(tmp_path: Path) -> Path:
    """SpatialRGPT-Bench_v1.json (a JSON list) + Omni3D-style image paths under the media root."""
    root = tmp_path / "srgpt"
    rel = [Path("SUNRGBD/kv2/frame0/image/0000000.jpg"), Path("SUNRGBD/kv2/frame100/image/0000100.jpg")]
    w, h = _frame_jpeg(root / "images" / rel[0], 0)
    _frame_jpeg(root / "images" / rel[1], 100)
    left = np.zeros((h, w), np.uint8)
    left[120:330, 40:200] = 1
    right = np.zeros((h, w), np.uint8)
    right[120:330, 420:600] = 1
    rle = [{"size": [h, w], "counts": _rle_runs(m)} for m in (left, right)]
    boxes = [[40, 120, 200, 330], [420, 120, 600, 330]]

    def rec(i: int, qa_type: str, cat: str, human: str, text_q: str, answer: str, *, with_rle: bool = True,
            image: int = 0) -> dict:
        r = {"id": f"{qa_type}_{i}", "image_info": {"file_path": str(rel[image]), "height": h, "width": w},
             "text_q": text_q, "qa_info": {"type": qa_type, "category": cat}, "bbox": boxes,
             "conversations": [{"from": "human", "value": "<image>\n" + human}, {"from": "gpt", "value": answer}]}
        if with_rle:
            r["rle"] = rle
        return r

    records = [
        rec(0, "qualitative", "left_predicate", "Is <mask> to the left of <mask>?",
            "Is Region [0] to the left of Region [1]?", "Yes, Region [0] is to the left of Region [1]."),
        rec(1, "qualitative", "tall_choice", "Which is taller, <mask> or <mask>?",
            "Which is taller, Region [0] or Region [1]?", "Region [1] is taller.", with_rle=False),
        rec(2, "quantitative", "distance_data", "How far apart are <mask> and <mask>?",
            "How far apart are Region [0] and Region [1]?", "They are 42.5 centimeters apart.", image=1),
        rec(3, "quantitative", "width_data", "Measure the width of <mask>.", "Measure the width of Region [0].",
            "The width of Region [0] is 3.1 inches."),
        rec(4, "quantitative", "direction", "If you are at <mask>, where will you find <mask>?",
            "If you are at Region [0], where will you find Region [1]?",
            "Region [0] will find Region [1] around the 3 o'clock direction."),
    ]
    records[3]["rle"] = [{"size": [h, w], "counts": "broken"}]  # undecodable RLE: boxes are used, as theirs does
    # the Hugging Face export stores nested fields as strings
    records[4].update({k: repr(records[4][k]) for k in ("image_info", "qa_info", "conversations", "bbox")})
    root.mkdir(exist_ok=True)
    (root / "SpatialRGPT-Bench_v1.json").write_text(json.dumps(records))
    return root


def test_vsibench_end_to_end_with_resume(service: str, vsibench_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _run_eval(str(vsibench_dir), "--format", "vsibench", "--url", service, "--out", str(out), "--limit", "3")
    assert first.returncode == 0, first.stdout + first.stderr
    rows = _results(out)
    assert [r["id"] for r in sorted(rows, key=lambda r: int(r["id"]))] == ["0", "1", "2"]
    assert all(not r.get("error") and r["finish_reason"] in ("stop", "length") for r in rows), rows
    assert all(r["usage"]["completion_tokens"] <= 16 for r in rows)  # the benchmark's max_new_tokens
    assert rows[0]["question"].startswith("These are frames of a video.\n")
    done_bytes = (out / "results.jsonl").read_bytes()
    # A run killed mid-write leaves a torn last line: the resume must cut it and redo that item.
    with open(out / "results.jsonl", "ab") as f:
        f.write(b'{"id": "3", "category": "object_rel')

    second = _run_eval(str(vsibench_dir), "--format", "vsibench", "--url", service, "--out", str(out))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "6 items, 3 already in" in second.stdout
    assert (out / "results.jsonl").read_bytes().startswith(done_bytes)  # finished lines untouched
    ran = [line for line in second.stdout.splitlines() if line.startswith("[")]
    assert len(ran) == 3 and not any(f"] {i} " in line for line in ran for i in "012"), ran
    rows = _results(out)
    assert sorted(int(r["id"]) for r in rows) == list(range(6))

    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "vsibench" and report["n"] == 6 and report["request_errors"] == 0
    assert report["unfinished"] == 0 and report["max_new_tokens"] == 16
    # The tiny demo checkpoint answered, and the report says so (issue 28).
    assert report["demo_model"] is True and report["demo_model_rows"] == 6 and "demo_model_note" in report
    # rel-direction levels fold into one category, as the benchmark reports it
    assert list(report["categories"]) == ["object_counting", "object_abs_distance", "room_size_estimation",
                                          "object_rel_distance", "object_rel_direction", "route_planning"]
    for row in report["categories"].values():
        assert 0.0 <= row["score"] <= 100.0 and row["n"] == 1
    means = [row["score"] for row in report["categories"].values()]
    assert report["overall"]["overall"] == pytest.approx(sum(means) / len(means))
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    third = _run_eval(str(vsibench_dir), "--format", "vsibench", "--url", service, "--out", str(out))
    assert third.returncode == 0 and "6 items, 6 already in" in third.stdout
    assert not [line for line in third.stdout.splitlines() if line.startswith("[")]  # nothing re-asked


def test_spatialrgpt_end_to_end_in_process(spatialrgpt_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = _run_eval(str(spatialrgpt_dir / "SpatialRGPT-Bench_v1.json"), "--format", "spatialrgpt", "--in-process",
                  "--media-root", str(spatialrgpt_dir / "images"), "--out", str(out), "--max-tokens", "12",
                  env={"SR3D_DATA_DIR": str(tmp_path / "data")})
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {row["id"]: row for row in _results(out)}
    assert len(rows) == 5 and not any(row.get("error") for row in rows.values()), rows
    assert rows["qualitative_0"]["question"] == "Is <region0> to the left of <region1>?"
    assert rows["qualitative_0"]["judge_question"] == "Is Region [0] to the left of Region [1]?"
    assert all(row["usage"]["completion_tokens"] <= 12 for row in rows.values())
    report = json.loads((out / "report.json").read_text())
    assert set(report["categories"]) == {"left/right", "tall/short", "direct_distance", "width", "direction"}
    assert set(report["overall"]) == {"qualitative", "quantitative"}
    assert report["n"] == 5 and report["request_errors"] == 0 and report["max_new_tokens"] == 12
    unmatched = [row["id"] for row in rows.values() if not metrics.srgpt_item_score(
        row["qa_type"], row["category"], row["judge_question"], row["ground_truth"], row["prediction"])["matched"]]
    assert report["match_fail_count"] == len(unmatched)
    assert (out / "report.png").stat().st_size > 1000


def test_bad_dataset_is_a_clear_error(tmp_path: Path) -> None:
    r = _run_eval(str(tmp_path), "--format", "vsibench", "--url", "http://127.0.0.1:9", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no annotation file" in r.stderr
    r = _run_eval(str(tmp_path), "--format", "vsibench", "--concurrency", "0", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--concurrency" in r.stderr  # rejected up front, not a run that waits forever
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 0, "dataset": "scannet", "scene_name": "s", "question_type": "nonsense",
                               "question": "q", "options": None, "ground_truth": "1"}) + "\n")
    r = _run_eval(str(bad), "--format", "vsibench", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "nonsense" in r.stderr and "Traceback" not in r.stderr


def test_unreachable_service_leaves_items_unfinished_for_the_next_run(vsibench_dir: Path, tmp_path: Path) -> None:
    from service.local_stack import free_port

    out = tmp_path / "out"
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: every submit is refused (transient)
    r = _run_eval(str(vsibench_dir), "--format", "vsibench", "--url", url, "--out", str(out), "--limit", "2")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 items unfinished" in r.stderr
    assert (out / "results.jsonl").read_text() == ""  # nothing recorded, so a later run asks them all
    report = json.loads((out / "report.json").read_text())
    assert report["unfinished"] == 2 and report["n"] == 0
