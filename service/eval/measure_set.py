"""Write the project's region-measurement set (model/measure/synthetic.py) to disk in SpatialRGPT-Bench's
release layout, so `sr3d eval OUT --format spatialrgpt` runs it like the real bench.

Layout of OUT (all paths in the records are relative to OUT, the default media root):

    measure_set.json          a JSON list of records (the only .json file here: the loader globs *.json)
    media/scene_<seed>.mp4    every rendered view of the scene, one video frame per view (multi-view items)
    media/scene_<seed>.png    the reference view alone (single-image items, `--views single|both`)
    scenes/scene_<seed>.npz   exact depth [F,H,W] float32 metres, intrinsics [F,3,3], poses [F,4,4]
                              camera-to-world (frame 0's camera = world), frame_indices [F] = 0..F-1
    README.md                 this layout and the command that wrote it

A record has SpatialRGPT-Bench's fields, read by `service/eval/datasets.py` as for the bench:
`id`, `image_info {file_path, height, width}`, `text_q`, `qa_info {type, category}`,
`conversations [{human: "<image>\\n... <mask> ..."}, {gpt: answer}]`, `rle` and `bbox` per region (the
region on its first listed frame). Extension fields (absent from the real bench, optional for the loader):

- `scene_file`: the item's `scenes/scene_<seed>.npz`, sent as the request's `scene` part (exact
  metric depth) unless `sr3d eval --no-scene`;
- `frames`: per region, `[{frame, rle}, ...]`: its exact mask on every view that shows it
  (>= synthetic.MIN_VISIBLE_PX pixels), so one object is measured from several frames;
- `benchmark`: `spatialrgpt`, or `vsibench` for VSI-Bench-style items (`qa_info.type` "numeric",
  category `object_size_estimation` / `object_abs_distance`, answer a bare number in the benchmark's
  unit: cm / m), sent with VSI-Bench's prompt and scored with its MRA;
- `views` (`multi` | `single`), `scene_seed`, `objects` (scene object behind each region), `value`
  (the exact number / hour / truth behind the answer text).

Video: H.264 in 4:4:4 at qp 0 (lossless in YUV; the RGB->YUV round trip moves a colour by a few
levels at most, never the pixel grid), 5 frames per second, one frame per view. Masks are per view
index, so only frame indices have to survive the codec: the writer decodes the file back and checks
the frame count and size.
"""
from __future__ import annotations

import io
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ANNOTATION = "measure_set.json"
VIEWS = ("multi", "single", "both")
VIDEO_FPS = 5


@dataclass
class SetSummary:
    items: int
    scenes: int
    categories: dict[str, int]
    path: Path


# --- COCO RLE (compressed string form), the inverse of datasets.decode_coco_rle ----------------------


def _runs(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with a run of zeros (possibly empty), as COCO stores them."""
    flat = (np.asarray(mask) > 0).T.reshape(-1).astype(np.int8)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return runs if flat.size and flat[0] == 0 else [0, *runs]


def _rle_string(counts: list[int]) -> str:
    """COCO's compressed counts: from the third count on, a delta against the count two back; each
    value in 5-bit groups (+48), 0x20 = more groups follow, the last group's 0x10 carries the sign."""
    out = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        more = True
        while more:
            b = x & 0x1F
            x >>= 5
            more = not ((x == 0 and not b & 0x10) or (x == -1 and b & 0x10))
            if more:
                b |= 0x20
            out.append(chr(b + 48))
    return "".join(out)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    h, w = np.shape(mask)
    return {"size": [int(h), int(w)], "counts": _rle_string(_runs(mask))}


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


# --- media -----------------------------------------------------------------------------------------


def write_video(frames: np.ndarray, path: Path) -> None:
    """uint8 [F,H,W,3] -> H.264 4:4:4 qp 0 mp4, one frame per view; checked by decoding it back."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=VIDEO_FPS)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        s.options = {"qp": "0", "preset": "medium"}
        for img in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    with av.open(str(path)) as c:
        back = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    if len(back) != len(frames) or back[0].shape != frames[0].shape:
        raise RuntimeError(f"{path}: wrote {len(frames)} frames {frames[0].shape}, read back {len(back)}")
    worst = max(int(np.abs(a.astype(np.int16) - b).max()) for a, b in zip(back, frames))
    if worst > 8:  # a codec that rounds more than the colour conversion does: say so, don't ship it
        raise RuntimeError(f"{path}: colours moved by {worst} levels through the codec")


def _write_png(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _write_scene(scene: Any, path: Path) -> None:
    from model.synthetic_rgbd import scene_rgbd

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, **scene_rgbd(scene))
    path.write_bytes(buf.getvalue())


# --- records ---------------------------------------------------------------------------------------


def _record(item: Any, scene: Any, views: str, media: str, scene_file: str) -> dict[str, Any] | None:
    """The item's SpatialRGPT-Bench record with our extension fields; None when a region is not
    visible in the views this variant sends (single view: the reference frame only)."""
    rec = item.to_record()
    frames: list[list[dict[str, Any]]] = []
    for k in item.objects:
        masks = scene.masks(k, [0] if views == "single" else None)
        if not masks:
            return None
        frames.append([{"frame": int(m.frame), "rle": encode_rle(m.mask)} for m in masks])
    first = [scene.masks(k, [f[0]["frame"]])[0].mask for k, f in zip(item.objects, frames)]
    h, w = scene.instance.shape[1:]
    rec.update(
        id=item.id if views == "multi" else f"{item.id}-single",
        image_info={"file_path": media, "height": int(h), "width": int(w)},
        rle=[f[0]["rle"] for f in frames], bbox=[_bbox(m) for m in first],
        frames=frames, scene_file=scene_file, views=views,
    )
    if isinstance(rec.get("value"), (np.floating, np.integer, np.bool_)):
        rec["value"] = rec["value"].item()
    return rec


_README = """# SR-3D region-measurement set

Written by `{command}`.
{items} questions over {scenes} synthetic scenes (seeds {first}..{last}), views: {views}.

Layout and record fields: see `service/eval/measure_set.py` (SpatialRGPT-Bench's record layout plus
`scene_file`, `frames`, `benchmark`, `views`, `scene_seed`, `objects`, `value`). Run it with

    sr3d eval {out} --format spatialrgpt --in-process --answer-mode measured --out runs/measure
    sr3d eval {out} --format spatialrgpt --in-process --answer-mode measured --no-scene --out runs/measure-depth-model

Per category:
{table}
"""


def write_set(out: Path, *, scenes: int = 6, per_category: int = 2, seed: int = 0, views: str = "multi",
              command: str = "") -> SetSummary:
    """Render `scenes` scenes, generate their items and write the set under `out` (see the module doc)."""
    from model.measure.synthetic import build_set

    if views not in VIEWS:
        raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
    rendered, items = build_set(scenes, per_category, seed=seed)
    by_seed = {sc.seed: sc for sc in rendered}
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for sc in rendered:
        scene_file = f"scenes/scene_{sc.seed}.npz"
        _write_scene(sc, out / scene_file)
        if views in ("multi", "both"):
            write_video(sc.frames, out / f"media/scene_{sc.seed}.mp4")
        if views in ("single", "both"):
            _write_png(sc.frames[0], out / f"media/scene_{sc.seed}.png")
    for variant in (("multi", "single") if views == "both" else (views,)):
        suffix = "mp4" if variant == "multi" else "png"
        for item in items:
            rec = _record(item, by_seed[item.scene_seed], variant, f"media/scene_{item.scene_seed}.{suffix}",
                          f"scenes/scene_{item.scene_seed}.npz")
            if rec is not None:
                records.append(rec)
    path = out / ANNOTATION
    path.write_text(json.dumps(records) + "\n")
    cats: dict[str, int] = {}
    for r in records:
        cats[r["qa_info"]["category"]] = cats.get(r["qa_info"]["category"], 0) + 1
    table = "\n".join(f"- {c}: {n}" for c, n in sorted(cats.items()))
    (out / "README.md").write_text(_README.format(
        command=command or f"sr3d measure-set {shlex.quote(str(out))}", items=len(records), scenes=scenes,
        first=seed, last=seed + scenes - 1, views=views, out=shlex.quote(str(out)), table=table))
    return SetSummary(items=len(records), scenes=scenes, categories=cats, path=path)
