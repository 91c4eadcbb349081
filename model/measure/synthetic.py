"""Synthetic scenes with exact depth and known boxes, and a SpatialRGPT-Bench-style question set on them.

Scene: a finite floor (z = 0 in the scene's own frame, z up) and 4-6 boxes of known size and yaw, some
stacked on others; pinhole cameras around it looking at its middle (frame 0 is the reference view,
in front of the scene). Depth is ray-cast per pixel (exact z-depth), and every pixel knows which
object it sees, so the instance masks are exact. Output `PointMaps` follow the model's convention:
world = frame 0's camera (OpenCV axes), metric=True, scale=1.0 (points in metres), source "synthetic".

Questions: every SpatialRGPT-Bench category (24 qualitative, 6 quantitative; their `qa_info.category`
names, as `service/eval/metrics.py` groups them) plus VSI-Bench's object size and absolute distance.
Ground truth comes from the known boxes with the definitions of `model/measure/pairs.py` and
`boxes.py`, in the reference view's gravity frame (right = scene +x, up = +z, forward = +y). Items
are asked only where the truth is clear-cut (documented margins in `_MARGINS`), as a human-verified
benchmark would. Everything is deterministic given the seed.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path
from typing import Any

import numpy as np

from model.geometry.types import PointMaps
from model.inputs import RegionMask

IMAGE_W, IMAGE_H = 320, 240
FOCAL = 280.0
FLOOR_HALF = 6.0  # the floor is a 12 m square
MIN_VISIBLE_PX = 60


@dataclass(frozen=True)
class SynthBox:
    center: tuple[float, float, float]  # scene frame, metres (z up)
    size: tuple[float, float, float]  # width (local x), depth (local y), height (z)
    yaw: float  # radians about z, from the scene's x axis

    @property
    def rotation(self) -> np.ndarray:
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])

    def surface_points(self, n: int = 24) -> np.ndarray:
        """A grid of points on all six faces (scene frame): for closest-point ground truth."""
        g = np.linspace(-0.5, 0.5, n)
        a, b = np.meshgrid(g, g)
        a, b = a.ravel(), b.ravel()
        faces = []
        for axis in range(3):
            for sign in (-0.5, 0.5):
                p = np.zeros((a.size, 3))
                others = [i for i in range(3) if i != axis]
                p[:, axis] = sign
                p[:, others[0]], p[:, others[1]] = a, b
                faces.append(p)
        local = np.concatenate(faces) * np.array(self.size)
        return local @ self.rotation.T + np.array(self.center)


@dataclass
class SynthScene:
    seed: int
    pointmaps: PointMaps
    instance: np.ndarray  # int16 [F, H, W]: object index, -1 floor, -2 nothing (no depth)
    boxes: list[SynthBox]
    scene_to_world: np.ndarray  # [4, 4]: scene frame -> world (frame 0 camera)
    frames: np.ndarray = field(default_factory=lambda: np.zeros(0))  # uint8 [F, H, W, 3] flat-shaded images
    depth: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float32 [F, H, W] z-depth, metres, 0 = none
    camera_poses: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [F, 4, 4] camera-to-scene (OpenCV)

    def rgbd_arrays(self) -> dict[str, np.ndarray]:
        """The scene as the RGB-D upload the service reads (`model.geometry.rgbd.load_scene_npz` keys):
        np.savez(buf, **scene.rgbd_arrays()) next to `frames` as the media."""
        return {"depth": self.depth.astype(np.float32), "intrinsics": self.pointmaps.intrinsics.astype(np.float64),
                "poses": self.camera_poses.astype(np.float64)}

    def masks(self, k: int, frames: list[int] | None = None) -> list[RegionMask]:
        """Object k's exact instance masks on every frame where it shows at least MIN_VISIBLE_PX pixels."""
        out = []
        for f in range(self.instance.shape[0]) if frames is None else frames:
            m = self.instance[f] == k
            if int(m.sum()) >= MIN_VISIBLE_PX:
                out.append(RegionMask(frame=f, mask=m))
        return out


def _look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    fwd = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    T = np.eye(4)
    T[:3, :3] = np.stack([right, down, fwd], axis=1)
    T[:3, 3] = eye
    return T


def _place_boxes(rng: np.random.Generator, n: int) -> list[SynthBox]:
    boxes: list[SynthBox] = []
    footprints: list[tuple[float, float, float]] = []  # x, y, radius of the floor boxes
    for _ in range(400):
        if len(boxes) == n:
            break
        w, d = rng.uniform(0.25, 1.0, size=2)
        h = rng.uniform(0.2, 1.1)
        yaw = math.radians(rng.uniform(-25, 25))
        stack_on = [i for i, b in enumerate(boxes) if b.center[2] == b.size[2] / 2 and min(b.size[:2]) > 0.55]
        if stack_on and rng.random() < 0.3:
            base = boxes[int(rng.choice(stack_on))]
            w, d = rng.uniform(0.2, 0.45, size=2)
            h = rng.uniform(0.15, 0.5)
            if any(b.center[0] == base.center[0] and b.center[1] == base.center[1] and b is not base for b in boxes):
                continue
            boxes.append(SynthBox((base.center[0], base.center[1], base.size[2] + h / 2), (w, d, h), base.yaw))
            continue
        x, y = rng.uniform(-1.8, 1.8), rng.uniform(-1.2, 1.6)
        r = 0.5 * math.hypot(w, d)
        if any(math.hypot(x - fx, y - fy) < r + fr + 0.15 for fx, fy, fr in footprints):
            continue
        footprints.append((x, y, r))
        boxes.append(SynthBox((x, y, h / 2), (w, d, h), yaw))
    return boxes


def _cameras(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    target = np.array([0.0, 0.2, 0.3])
    poses = [_look_at(np.array([0.0, -4.2, rng.uniform(1.7, 2.1)]), target)]  # forward = +y exactly
    for i in range(1, n):
        ang = math.radians(-90 - (-1) ** i * (30 + 25 * ((i - 1) // 2)) + rng.uniform(-8, 8))
        rad = rng.uniform(3.6, 4.6)
        eye = np.array([rad * math.cos(ang), rad * math.sin(ang) + 0.2, rng.uniform(1.6, 2.4)])
        poses.append(_look_at(eye, target + rng.uniform(-0.2, 0.2, size=3) * [1, 1, 0]))
    return poses


def _intrinsics(width: int, height: int) -> np.ndarray:
    f = FOCAL * width / IMAGE_W
    return np.array([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1.0]])


def _render(pose: np.ndarray, boxes: list[SynthBox], width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """z-depth [H, W] (0 = no hit) and instance ids [H, W] of one camera."""
    K = _intrinsics(width, height)
    u, v = np.meshgrid(np.arange(width, dtype=float), np.arange(height, dtype=float))
    rays_c = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T  # camera z = 1 -> t is z-depth
    d = rays_c.reshape(-1, 3) @ pose[:3, :3].T
    o = pose[:3, 3]
    best = np.full(d.shape[0], np.inf)
    ids = np.full(d.shape[0], -2, dtype=np.int16)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_floor = np.where(d[:, 2] < 0, -o[2] / d[:, 2], np.inf)
        hit = o[None, :2] + t_floor[:, None] * d[:, :2]
        t_floor[(np.abs(hit) > FLOOR_HALF).any(axis=1)] = np.inf
        best, ids = np.where(t_floor < best, t_floor, best), np.where(t_floor < best, -1, ids).astype(np.int16)
        for k, b in enumerate(boxes):
            Rt = b.rotation.T
            ol = Rt @ (o - np.array(b.center))
            dl = d @ Rt.T
            half = np.array(b.size) / 2
            t1 = (-half - ol) / dl
            t2 = (half - ol) / dl
            tn = np.nanmax(np.minimum(t1, t2), axis=1)
            tf = np.nanmin(np.maximum(t1, t2), axis=1)
            ok = (tn <= tf) & (tf > 0) & (tn > 0) & (tn < best)
            best = np.where(ok, tn, best)
            ids = np.where(ok, k, ids).astype(np.int16)
    depth = np.where(np.isfinite(best), best, 0.0)
    return depth.reshape(height, width), ids.reshape(height, width)


def render_scene(seed: int, *, n_objects: int | None = None, n_frames: int = 5, width: int = IMAGE_W,
                 height: int = IMAGE_H) -> SynthScene:
    """Scene `seed` seen by `n_frames` cameras of `width` x `height` pixels (the same scene and cameras
    for any image size: the focal length scales with the width)."""
    rng = np.random.default_rng(seed)
    boxes = _place_boxes(rng, n_objects or int(rng.integers(4, 7)))
    poses = _cameras(rng, n_frames)
    K = _intrinsics(width, height)
    depths, ids = zip(*(_render(p, boxes, width, height) for p in poses))
    depth, inst = np.stack(depths), np.stack(ids)
    u, v = np.meshgrid(np.arange(width, dtype=float), np.arange(height, dtype=float))
    cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)[None] * depth[..., None]
    world_from_scene = np.linalg.inv(poses[0])
    rel = np.stack([world_from_scene @ p for p in poses])  # camera -> world (frame 0 camera)
    pts = np.einsum("fij,fhwj->fhwi", rel[:, :3, :3], cam) + rel[:, None, None, :3, 3]
    valid = depth > 0
    pts[~valid] = 0.0
    palette = rng.integers(40, 255, size=(len(boxes) + 2, 3)).astype(np.uint8)
    images = palette[np.where(inst >= 0, inst, len(boxes) + 1 + np.minimum(inst, -1) + 1)]
    pm = PointMaps(points=pts.astype(np.float32), valid=valid, intrinsics=np.repeat(K[None], n_frames, 0).astype(np.float32),
                   poses=rel.astype(np.float32), scale=1.0, metric=True, source="synthetic")
    return SynthScene(seed=seed, pointmaps=pm, instance=inst, boxes=boxes, scene_to_world=world_from_scene,
                      frames=images, depth=depth.astype(np.float32), camera_poses=np.stack(poses))


# --- ground truth -------------------------------------------------------------------------------
# Reference view's gravity frame in scene coordinates: camera 0 looks along +y (its horizontal
# forward), so right = +x, up = +z, forward = +y.


def _dims(b: SynthBox) -> dict[str, float]:
    w, d, h = b.size
    return {"width": w, "height": h, "depth": d, "longest": max(w, d, h), "volume": w * d * h}


def _clock(dx: float, dy: float) -> int:
    hour = int(round((math.degrees(math.atan2(dx, dy)) % 360) / 30)) % 12
    return 12 if hour == 0 else hour


def _closest(a: SynthBox, b: SynthBox) -> float:
    pa, pb = a.surface_points(), b.surface_points()
    best = np.inf
    for i in range(0, len(pa), 1024):
        c = pa[i:i + 1024]
        best = min(best, float((((c[:, None] - pb[None]) ** 2).sum(-1)).min()))
    return math.sqrt(best)


# Ask only where the truth is clear-cut: positional offsets >= 0.2 m, size ratios >= 1.25,
# distances >= 0.3 m (vertical >= 0.15 m).
_MARGINS = {"offset": 0.2, "ratio": 1.25, "distance": 0.3, "vertical": 0.15}


@dataclass
class SyntheticItem:
    id: str
    benchmark: str  # "spatialrgpt" | "vsibench"
    qa_type: str  # qualitative | quantitative (SpatialRGPT) | numeric (VSI-Bench)
    category: str  # SpatialRGPT qa_info.category / VSI-Bench question_type
    scene_seed: int
    objects: list[int]  # scene object of <region0>, <region1>, ...
    question: str  # our form: regions as <region0>, <region1>
    answer: str  # ground-truth text in the benchmark's style
    value: Any  # the number / hour / bool / region index behind `answer`

    def to_record(self) -> dict[str, Any]:
        """SpatialRGPT-Bench's record layout (`service/eval/datasets.py`): `<mask>` per region in order;
        the media (frames, masks) come from `render_scene(scene_seed)` and `SynthScene.masks(object)`."""
        human = self.question
        for k in range(len(self.objects)):
            human = human.replace(f"<region{k}>", "<mask>")
        return {"id": self.id, "image_info": {"file_path": f"synthetic/scene_{self.scene_seed}",
                                              "height": IMAGE_H, "width": IMAGE_W},
                "text_q": self.question.replace("<region0>", "Region [0]").replace("<region1>", "Region [1]"),
                "qa_info": {"type": self.qa_type, "category": self.category},
                "conversations": [{"from": "human", "value": "<image>\n" + human},
                                  {"from": "gpt", "value": self.answer}],
                "scene_seed": self.scene_seed, "objects": self.objects, "benchmark": self.benchmark,
                "value": self.value}


def _fmt_m(x: float) -> str:
    return f"{x:.3f} meters"


A, B = "<region0>", "<region1>"
RA, RB = "Region [0]", "Region [1]"

# (category, question template, truth(a, b) -> bool) for yes/no predicates: A relative to B.
_PREDICATES: list[tuple[str, str, str]] = [
    ("left_predicate", "Is {A} to the left of {B} from the viewer's perspective?", "left"),
    ("right_predicate", "Does {A} appear on the right side of {B}?", "right"),
    ("above_predicate", "Is {A} above {B}?", "above"),
    ("below_predicate", "Can you confirm if {A} is positioned below {B}?", "below"),
    ("big_predicate", "Is {A} bigger than {B}?", "big"),
    ("small_predicate", "Does {A} have a smaller size compared to {B}?", "small"),
    ("tall_predicate", "Is {A} taller than {B}?", "tall"),
    ("short_predicate", "Can you confirm if {A} is shorter than {B}?", "short"),
    ("wide_predicate", "Does {A} have a greater width compared to {B}?", "wide"),
    ("thin_predicate", "Is {A} thinner than {B}?", "thin"),
    ("behind_predicate", "Is {A} behind {B}?", "behind"),
    ("front_predicate", "Is {A} closer to the viewer compared to {B}?", "front"),
]
_CHOICES: list[tuple[str, str, str]] = [
    ("left_choice", "Which is more to the left, {A} or {B}?", "left"),
    ("right_choice", "Between {A} and {B}, which one appears on the right side from the viewer's perspective?", "right"),
    ("above_choice", "Which is above, {A} or {B}?", "above"),
    ("below_choice", "Between {A} and {B}, which one is positioned lower?", "below"),
    ("big_choice", "Which is bigger, {A} or {B}?", "big"),
    ("small_choice", "Between {A} and {B}, which one is smaller?", "small"),
    ("tall_choice", "Who is taller, {A} or {B}?", "tall"),
    ("short_choice", "Which of these two, {A} or {B}, stands shorter?", "short"),
    ("wide_choice", "Which is wider, {A} or {B}?", "wide"),
    ("thin_choice", "Between {A} and {B}, which one is thinner?", "thin"),
    ("behind_choice", "Which is behind, {A} or {B}?", "behind"),
    ("front_choice", "Who is more forward, {A} or {B}?", "front"),
]
_WORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below",
          "big": "bigger than", "small": "smaller than", "tall": "taller than", "short": "shorter than",
          "wide": "wider than", "thin": "thinner than", "behind": "behind", "front": "in front of"}
_CHOICE_WORDS = {"left": "is more to the left", "right": "is more to the right", "above": "is above",
                 "below": "is below", "big": "is bigger", "small": "is smaller", "tall": "is taller",
                 "short": "is shorter", "wide": "is wider", "thin": "is thinner", "behind": "is behind",
                 "front": "is in front"}
_QUANT: list[tuple[str, str]] = [
    ("distance_data", "What is the distance between {A} and {B}?"),
    ("horizontal_distance_data", "How far apart are {A} and {B} horizontally?"),
    ("vertical_distance_data", "What is the vertical distance between {A} and {B}?"),
    ("width_data", "How wide is {A}?"),
    ("height_data", "What is the height of {A}?"),
    ("direction", "If you are at {A}, where will you find {B}?"),
]
VSI_SIZE_Q = ("What is the length of the longest dimension (length, width, or height) of {A}, measured in centimeters?")
VSI_DIST_Q = ("Measuring from the closest point of each object, what is the direct distance between {A} and {B} "
              "(in meters)?")


def _relation(rel: str, a: SynthBox, b: SynthBox) -> tuple[bool, bool]:
    """(truth of "A rel B", clear-cut?)."""
    da, db = _dims(a), _dims(b)
    off = {"left": b.center[0] - a.center[0], "right": a.center[0] - b.center[0],
           "above": a.center[2] - b.center[2], "below": b.center[2] - a.center[2],
           "behind": a.center[1] - b.center[1], "front": b.center[1] - a.center[1]}
    if rel in off:
        return off[rel] > 0, abs(off[rel]) >= _MARGINS["offset"]
    key, bigger = {"big": ("volume", True), "small": ("volume", False), "tall": ("height", True),
                   "short": ("height", False), "wide": ("width", True), "thin": ("width", False)}[rel]
    x, y = da[key], db[key]
    return (x > y) if bigger else (x < y), max(x, y) / min(x, y) >= _MARGINS["ratio"]


def generate_items(scenes: list[SynthScene], per_category: int = 2, *, seed: int = 0) -> list[SyntheticItem]:
    """Up to `per_category` items per category per scene, over object pairs whose masks show on at
    least one frame; ids are stable for a given (scenes, per_category, seed)."""
    rng = np.random.default_rng(seed)
    items: list[SyntheticItem] = []
    for sc in scenes:
        visible = [k for k in range(len(sc.boxes)) if sc.masks(k)]
        pairs = list(permutations(visible, 2))
        order = rng.permutation(len(pairs)) if pairs else []
        shuffled = [pairs[i] for i in order]

        def add(bench: str, qa_type: str, cat: str, objs: list[int], q: str, ans: str, value: Any) -> None:
            items.append(SyntheticItem(id=f"s{sc.seed}-{cat}-{len([i for i in items if i.scene_seed == sc.seed and i.category == cat])}",
                                       benchmark=bench, qa_type=qa_type, category=cat, scene_seed=sc.seed,
                                       objects=objs, question=q, answer=ans, value=value))

        for cat, tmpl, rel in _PREDICATES:
            n = 0
            for a, b in shuffled:
                truth, clear = _relation(rel, sc.boxes[a], sc.boxes[b])
                if not clear or n >= per_category:
                    continue
                # Alternate yes and no answers so a constant answer cannot score.
                if truth != (n % 2 == 0):
                    continue
                ans = f"Yes, {RA} is {_WORDS[rel]} {RB}." if truth else f"No, {RA} is not {_WORDS[rel]} {RB}."
                add("spatialrgpt", "qualitative", cat, [a, b], tmpl.format(A=A, B=B), ans, truth)
                n += 1
        for cat, tmpl, rel in _CHOICES:
            n = 0
            for a, b in shuffled:
                truth, clear = _relation(rel, sc.boxes[a], sc.boxes[b])
                if not clear or n >= per_category:
                    continue
                if truth != (n % 2 == 0):
                    continue
                winner = RA if truth else RB
                add("spatialrgpt", "qualitative", cat, [a, b], tmpl.format(A=A, B=B),
                    f"{winner} {_CHOICE_WORDS[rel]}.", 0 if truth else 1)
                n += 1
        for cat, tmpl in _QUANT:
            n = 0
            for a, b in shuffled:
                if n >= per_category:
                    break
                ba, bb = sc.boxes[a], sc.boxes[b]
                ca, cb = np.array(ba.center), np.array(bb.center)
                if cat == "distance_data":
                    val = float(np.linalg.norm(cb - ca))
                    ok, ans = val >= _MARGINS["distance"], f"{RA} and {RB} are {_fmt_m(val)} apart."
                elif cat == "horizontal_distance_data":
                    val = float(math.hypot(*(cb - ca)[:2]))
                    ok, ans = val >= _MARGINS["distance"], f"{RA} and {RB} are {_fmt_m(val)} apart horizontally."
                elif cat == "vertical_distance_data":
                    val = float(abs(cb[2] - ca[2]))
                    ok, ans = val >= _MARGINS["vertical"], f"{RA} and {RB} are {_fmt_m(val)} apart vertically."
                elif cat == "width_data":
                    val, ok = _dims(ba)["width"], True
                    ans = f"The width of {RA} is {_fmt_m(val)}."
                elif cat == "height_data":
                    val, ok = _dims(ba)["height"], True
                    ans = f"{RA} is {_fmt_m(val)} tall."
                else:
                    d = cb - ca
                    val, ok = _clock(float(d[0]), float(d[1])), math.hypot(d[0], d[1]) >= _MARGINS["distance"]
                    ans = f"{RB} is roughly at {val} o'clock from {RA}."
                if not ok:
                    continue
                objs = [a] if cat in ("width_data", "height_data") else [a, b]
                if cat in ("width_data", "height_data") and any(
                        i.scene_seed == sc.seed and i.category == cat and i.objects == objs for i in items):
                    continue
                add("spatialrgpt", "quantitative", cat, objs, tmpl.format(A=A, B=B), ans, val)
                n += 1
        for n, k in enumerate(visible[:per_category]):
            val = _dims(sc.boxes[k])["longest"] * 100
            add("vsibench", "numeric", "object_size_estimation", [k], VSI_SIZE_Q.format(A=A), f"{val:.1f}", val)
        n = 0
        for a, b in shuffled:
            if n >= per_category or a > b:
                continue
            val = _closest(sc.boxes[a], sc.boxes[b])
            if val < _MARGINS["distance"]:
                continue
            add("vsibench", "numeric", "object_abs_distance", [a, b], VSI_DIST_Q.format(A=A, B=B), f"{val:.2f}", val)
            n += 1
    return items


def build_set(n_scenes: int = 6, per_category: int = 2, *, seed: int = 0) -> tuple[list[SynthScene], list[SyntheticItem]]:
    """The evaluation set: `n_scenes` scenes (seeds seed .. seed + n_scenes - 1) and their items."""
    scenes = [render_scene(seed + i) for i in range(n_scenes)]
    return scenes, generate_items(scenes, per_category, seed=seed)


def benchmark_job(seed: int = 3, *, frames: int = 32, width: int = 640, height: int = 480,
                  regions: int = 2) -> tuple[PointMaps, list[list[RegionMask]]]:
    """The measurement cost target's job: `frames` frames of `width` x `height` and `regions` regions
    (the largest objects, masked on every frame that shows them). Four distinct views are rendered
    and repeated (the cost of measuring does not depend on the frames being distinct)."""
    sc = render_scene(seed, n_frames=4, width=width, height=height)
    reps = -(-frames // 4)
    pm0 = sc.pointmaps

    def tile(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.concatenate([a] * reps)[:frames])

    pm = PointMaps(points=tile(pm0.points), valid=tile(pm0.valid), intrinsics=tile(pm0.intrinsics),
                   poses=tile(pm0.poses), scale=1.0, metric=True, source="synthetic")
    inst = tile(sc.instance)
    biggest = sorted(range(len(sc.boxes)), key=lambda k: -int((sc.instance == k).sum()))[:regions]
    masks = [[RegionMask(frame=f, mask=inst[f] == k) for f in range(frames) if (inst[f] == k).any()] for k in biggest]
    return pm, masks


def export_set(out_dir: Path, n_scenes: int = 6, per_category: int = 2, *, seed: int = 0) -> Path:
    """Write the set to disk for `sr3d eval`: per scene `scene_<seed>/frames/NNNN.png` (flat-shaded
    colour), `scene_<seed>/rgbd.npz` (the RGB-D upload, `SynthScene.rgbd_arrays`) and
    `scene_<seed>/masks/obj<k>_f<f>.png` (exact instance masks); `items.jsonl` holds one record per
    question (`SyntheticItem.to_record`) plus `regions`: per region, its `{"frame", "mask"}` list
    (mask paths relative to `out_dir`). Returns the items file."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    scenes, items = build_set(n_scenes, per_category, seed=seed)
    region_files: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for sc in scenes:
        base = out_dir / f"scene_{sc.seed}"
        (base / "frames").mkdir(parents=True, exist_ok=True)
        (base / "masks").mkdir(exist_ok=True)
        for f, img in enumerate(sc.frames):
            Image.fromarray(img).save(base / "frames" / f"{f:04d}.png")
        np.savez_compressed(base / "rgbd.npz", **sc.rgbd_arrays())
        for k in range(len(sc.boxes)):
            entries = []
            for rm in sc.masks(k):
                rel = f"scene_{sc.seed}/masks/obj{k}_f{rm.frame}.png"
                Image.fromarray(rm.mask.astype(np.uint8) * 255).save(out_dir / rel)
                entries.append({"frame": rm.frame, "mask": rel})
            region_files[(sc.seed, k)] = entries
    path = out_dir / "items.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for it in items:
            rec = it.to_record()
            rec["regions"] = [region_files[(it.scene_seed, k)] for k in it.objects]
            fh.write(json.dumps(rec, default=float) + "\n")
    return path
