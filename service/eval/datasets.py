"""Read each benchmark's public release, unchanged, into `EvalItem`s: one API request each.

VSI-Bench (huggingface.co/datasets/nyu-visionx/VSI-Bench): `test-00000-of-00001.parquet` (or the
same records as `.jsonl`) with `id, dataset, scene_name, question_type, question, options,
ground_truth`, and the videos from `arkitscenes.zip`, `scannet.zip`, `scannetpp.zip` extracted
next to it as `{dataset}/{scene_name}.mp4` (the path their `vsibench_doc_to_visual` builds).

SpatialRGPT-Bench (huggingface.co/datasets/a8cheng/SpatialRGPT-Bench, read by SpatialRGPT's
`llava/eval/eval_spatial.py`): `SpatialRGPT-Bench_v1.json` (a JSON list; `.jsonl` with the same
records is accepted) whose records carry `id`, `image_info {file_path, height, width}`, `text_q`,
`qa_info {type, category}`, `conversations [{value: "<image>\\n... <mask> ..."}, {value: answer}]`,
`rle` (COCO RLE per region) and `bbox` ([x0, y0, x1, y1] per region); images are Omni3D's, at
`{media_root}/{image_info.file_path}`. Nested fields stored as strings (the Hugging Face export)
are parsed. As their script does, masks come from `rle` when it decodes
and from `bbox` otherwise.

The project's own region-measurement set (`sr3d measure-set`, service/eval/measure_set.py) is read
by the same loader through optional extension fields the real bench lacks: `scene_file` (an RGB-D
.npz sent as the request's `scene` part), `frames` (per region, its mask on each of several video
frames: `[{frame, rle}, ...]`, used instead of `rle`/`bbox`) and `benchmark: "vsibench"` (a VSI-Bench
style numeric item: VSI-Bench's prompt, 16 new tokens, scored with MRA).
"""
from __future__ import annotations

import ast
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.eval import metrics

FORMATS = ("vsibench", "spatialrgpt")


@dataclass
class EvalItem:
    id: str
    category: str  # VSI-Bench question_type / SpatialRGPT qa_info.category
    media: Path
    question: str  # exactly what is sent to the API
    ground_truth: str
    qa_type: str = ""  # SpatialRGPT: qualitative | quantitative
    judge_question: str = ""  # SpatialRGPT: text_q, the question its judge sees
    regions: list[list[dict[str, Any]]] = field(default_factory=list)
    masks: dict[str, bytes] = field(default_factory=dict)  # multipart part name -> PNG
    max_tokens: int = 16
    scene: Path | None = None  # measurement set: RGB-D .npz sent as the `scene` part (exact depth)
    benchmark: str = ""  # measurement set: "vsibench" for VSI-Bench-style items in a spatialrgpt file

    @property
    def region_frames(self) -> list[list[int]]:
        """The frames each region is drawn on (one per region for the real benchmarks)."""
        return [[int(a["frame"]) for a in region] for region in self.regions]


class DatasetError(ValueError):
    """The files do not look like the benchmark's release; the message says what is missing."""


def load(fmt: str, dataset: Path, media_root: Path | None = None) -> list[EvalItem]:
    if fmt == "vsibench":
        return list(_vsibench(dataset, media_root))
    if fmt == "spatialrgpt":
        return list(_spatialrgpt(dataset, media_root))
    raise DatasetError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")


def _records(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # an optional dependency: only the parquet release needs it
            raise DatasetError("reading .parquet needs pyarrow: pip install '.[eval]'") from e
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of records")
    return data


def _annotation_file(dataset: Path, patterns: tuple[str, ...]) -> Path:
    if dataset.is_file():
        return dataset
    for pattern in patterns:
        found = sorted(dataset.glob(pattern))
        if found:
            return found[0]
    raise DatasetError(f"{dataset}: no annotation file matching {' or '.join(patterns)}")


# --- VSI-Bench --------------------------------------------------------------------------------


def _vsibench(dataset: Path, media_root: Path | None) -> Iterator[EvalItem]:
    ann = _annotation_file(dataset, ("test-*.parquet", "*.parquet", "test*.jsonl", "*.jsonl"))
    root = media_root or ann.parent
    for rec in _records(ann):
        missing = {"id", "dataset", "scene_name", "question_type", "question", "ground_truth"} - rec.keys()
        if missing:
            raise DatasetError(f"{ann}: record without {sorted(missing)}")
        video = root / rec["dataset"] / f"{rec['scene_name']}.mp4"
        yield EvalItem(
            id=str(rec["id"]), category=rec["question_type"], media=video, ground_truth=str(rec["ground_truth"]),
            question=metrics.vsi_prompt(rec["question_type"], rec["question"], list(rec.get("options") or [])),
            max_tokens=metrics.VSI_MAX_NEW_TOKENS,
        )


# --- SpatialRGPT-Bench --------------------------------------------------------------------------

_MASK_TOKEN = re.compile(r"<mask>(\s*<depth>)?")
_REGION_WORDS = re.compile(r"Region \[(\d+)\]")


def srgpt_question(human_turn: str) -> str:
    """Their human turn → our question: `<image>` dropped (the service places the media), the K-th
    `<mask>` (with the `<depth>` their script appends) → `<regionK>`; the service renders that as
    `Region [K] <region>`, the same words the bench uses. Turns written with `Region [K]` only get
    the same mapping."""
    text = human_turn.replace("<image>", "").strip()
    counter = iter(range(1_000))
    if _MASK_TOKEN.search(text):
        return _MASK_TOKEN.sub(lambda _: f"<region{next(counter)}>", text)
    return _REGION_WORDS.sub(lambda m: f"<region{m.group(1)}>", text)


def decode_coco_rle(rle: dict[str, Any]) -> np.ndarray:
    """COCO run-length encoding → uint8 mask [h, w]. `counts` is a list of run lengths or the
    compressed string form; runs alternate 0/1 starting with 0, in column-major order."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = _rle_string_counts(counts.decode() if isinstance(counts, bytes) else counts)
    flat = np.zeros(h * w, dtype=np.uint8)
    pos, value = 0, 0
    for run in counts:
        if value:
            flat[pos:pos + run] = 1
        pos += run
        value ^= 1
    if pos != h * w:
        raise DatasetError(f"RLE covers {pos} pixels, size says {h}x{w}")
    return flat.reshape(w, h).T.copy()


def _rle_string_counts(s: str) -> list[int]:
    """The compressed COCO counts string: each count in 5-bit groups (char − 48), bit 0x20 = more
    groups follow, sign-extended from 0x10 in the last group; from the third count on, each value
    is a delta against the count two places back."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _png(mask: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((mask > 0).astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def _clamped_box(box: list[float], width: int, height: int) -> list[float] | None:
    # Their clamp_box, then int() as they do when painting the box mask.
    x0, y0, x1, y1 = (int(max(min(lim, v), 0)) for v, lim in zip(box, (width, height, width, height)))
    return [float(x0), float(y0), float(x1), float(y1)] if x1 > x0 and y1 > y0 else None


_STRUCTURED = ("image_info", "qa_info", "conversations", "bbox", "rle", "frames")


def _unstring(rec: dict[str, Any]) -> dict[str, Any]:
    """The Hugging Face export of the bench stores its nested fields as strings (Python literals
    or JSON); the GitHub JSON stores them as objects. Accept both."""
    out = dict(rec)
    for key in _STRUCTURED:
        value = out.get(key)
        if isinstance(value, str):
            try:
                out[key] = json.loads(value)
            except ValueError:
                try:
                    out[key] = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    raise DatasetError(f"item {rec.get('id')}: field {key!r} is neither JSON nor a literal") from None
    return out


def _spatialrgpt(dataset: Path, media_root: Path | None) -> Iterator[EvalItem]:
    ann = _annotation_file(dataset, ("SpatialRGPT-Bench*.json", "*.json", "*.jsonl"))
    root = media_root or ann.parent
    for rec in map(_unstring, _records(ann)):
        missing = {"id", "image_info", "conversations", "qa_info"} - rec.keys()
        if missing:
            raise DatasetError(f"{ann}: record without {sorted(missing)}")
        info = rec["image_info"]
        if rec.get("frames") is not None:  # measurement set: each region on several frames
            regions, masks = _frame_masks(rec, ann)
        else:
            regions, masks = _single_frame_masks(rec, info, ann)
        conv = rec["conversations"]
        question = srgpt_question(conv[0]["value"])
        # Their model silently ignores masks no <mask> token uses; our API rejects unreferenced
        # regions (422), so send only regions 0..K for the highest <regionK> the question names.
        used = [int(k) for k in re.findall(r"<region(\d+)>", question)]
        n_used = max(used) + 1 if used else 0
        regions = regions[:n_used]
        named = {a["mask"] for region in regions for a in region if "mask" in a}
        masks = {name: png for name, png in masks.items() if name in named}
        scene = root / rec["scene_file"] if rec.get("scene_file") else None
        common = dict(id=str(rec["id"]), category=rec["qa_info"]["category"], media=root / info["file_path"],
                      ground_truth=conv[1]["value"], regions=regions, masks=masks, scene=scene)
        if rec.get("benchmark") == "vsibench":  # VSI-Bench's prompt and decoding, scored with MRA
            if rec["qa_info"]["category"] not in metrics.VSI_NUMERIC_TYPES:
                raise DatasetError(f"{ann}: item {rec['id']}: VSI-Bench item of non-numeric type "
                                   f"{rec['qa_info']['category']!r}")
            yield EvalItem(**common, question=metrics.vsi_prompt(rec["qa_info"]["category"], question, None),
                           qa_type=rec["qa_info"]["type"], benchmark="vsibench", max_tokens=metrics.VSI_MAX_NEW_TOKENS)
            continue
        # Their script asks every human turn; the bench has one turn per item.
        yield EvalItem(**common, question=question, qa_type=rec["qa_info"]["type"], benchmark="spatialrgpt",
                       judge_question=rec.get("text_q", conv[0]["value"]), max_tokens=metrics.SRGPT_MAX_NEW_TOKENS)


def _single_frame_masks(rec: dict[str, Any], info: dict[str, Any], ann: Path) -> tuple[list[list[dict[str, Any]]], dict[str, bytes]]:
    """The bench's own regions: one per `rle` entry on frame 0, or per `bbox` when the RLE is absent or broken."""
    regions: list[list[dict[str, Any]]] = []
    masks: dict[str, bytes] = {}
    try:  # their order: RLE masks first, boxes when the RLE is absent or broken
        for k, rle in enumerate(rec["rle"]):
            masks[f"mask{k}"] = _png(decode_coco_rle(rle))
            regions.append([{"frame": 0, "mask": f"mask{k}"}])
    except (KeyError, TypeError, ValueError, IndexError):
        regions, masks = [], {}
        for box in rec.get("bbox") or []:
            clamped = _clamped_box(list(box), int(info["width"]), int(info["height"]))
            if clamped is None:
                raise DatasetError(f"{ann}: item {rec['id']}: empty box {box}") from None
            regions.append([{"frame": 0, "box": clamped}])
    return regions, masks


def _frame_masks(rec: dict[str, Any], ann: Path) -> tuple[list[list[dict[str, Any]]], dict[str, bytes]]:
    """The `frames` extension: region k's mask on frame f becomes part `mask{k}_f{f}`."""
    regions: list[list[dict[str, Any]]] = []
    masks: dict[str, bytes] = {}
    try:
        for k, anns in enumerate(rec["frames"]):
            region = []
            for a in anns:
                frame = int(a["frame"])
                name = f"mask{k}_f{frame}"
                masks[name] = _png(decode_coco_rle(a["rle"]))
                region.append({"frame": frame, "mask": name})
            if not region:
                raise ValueError(f"region {k} has no frames")
            regions.append(region)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise DatasetError(f"{ann}: item {rec.get('id')}: bad `frames` entry ({e})") from None
    return regions, masks
