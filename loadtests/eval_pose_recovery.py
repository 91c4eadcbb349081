"""Pose recovery on the real TUM RGB-D fr1_rpy window (tests/data/rgbd): ATE and RPE against ground truth.

    python -m loadtests.eval_pose_recovery [--data DIR]

Feeds the 10 colour + depth frames to `recover_poses` without their poses and prints JSON: ATE RMSE of
the camera centres after SE(3) Umeyama alignment (depth is metric, so no scale is fitted), the same
with no alignment beyond sharing the reference frame (stricter), and RPE between consecutive registered
frames (0.2 s apart when none is missing). Unregistered frames are listed with their reason, not scored.
Ground truth = cameras.json's poses (TUM motion capture interpolated to the RGB timestamps).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from model.geometry.pose_recovery import recover_poses
from model.geometry.trajectory import ate, rotation_angle_deg, rpe

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "rgbd"


def load_tum_window(data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(depth metres [F,H,W], K [3,3], colour uint8 [F,H,W,3], ground-truth camera-to-world [F,4,4])."""
    cams = json.loads((data / "cameras.json").read_text())
    scale = float(cams["depth"]["scale"])
    frames = cams["frames"]
    depth = np.stack([np.asarray(Image.open(data / f["depth"]), dtype=np.float64) / scale for f in frames])
    rgb = np.stack([np.asarray(Image.open(data / f["color"]).convert("RGB")) for f in frames])
    gt = np.array([f["T_world_cam"] for f in frames], dtype=np.float64)
    return depth, np.array(cams["intrinsics"]["K"], dtype=np.float64), rgb, gt


def evaluate(data: Path = DEFAULT_DATA) -> dict:
    depth, K, rgb, gt = load_tum_window(data)
    t0 = time.perf_counter()
    res = recover_poses(depth, K, rgb)
    seconds = time.perf_counter() - t0
    out: dict = {
        "sequence": "TUM RGB-D fr1_rpy, 10 frames 0.2 s apart",
        "frames": len(depth),
        "registered": res.num_registered,
        "unregistered": {str(k): v for k, v in res.reasons.items()},
        "keyframes": list(res.keyframes),
        "icp_refined": int(sum(res.refined)),
        "seconds_cpu": round(seconds, 2),
    }
    ok = res.registered
    if ok.sum() >= 3:
        est, ref = res.poses_c2w[ok], gt[ok]
        out["ate_se3_m"] = ate(est, ref)
        # Anchored: put the estimate into the ground-truth world through frame 0 only (no fit).
        anchored = gt[res.reference] @ est
        err = np.linalg.norm(anchored[:, :3, 3] - ref[:, :3, 3], axis=1)
        out["ate_anchored_rmse_m"] = float(np.sqrt((err**2).mean()))
        # Rotation drift, which ATE (camera centres only) hardly sees on this rotation-dominated clip.
        rot = rotation_angle_deg(np.linalg.inv(anchored[:, :3, :3]) @ ref[:, :3, :3])
        out["rotation_error_vs_reference_deg"] = {"max": float(rot.max()), "per_frame": [round(float(r), 2) for r in rot]}
        # Between consecutive registered frames (all 10 when everything registers).
        out["rpe_consecutive_registered"] = rpe(est, ref, 1)
    gt_path = float(np.linalg.norm(np.diff(gt[:, :3, 3], axis=0), axis=1).sum())
    out["gt_path_length_m"] = gt_path
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="directory with cameras.json, color/, depth/")
    args = p.parse_args(argv)
    print(json.dumps(evaluate(args.data), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
