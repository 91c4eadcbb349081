"""A synthetic scene (model/measure/synthetic.py) as the RGB-D upload a client would send for it.

`sr3d measure-set` writes each scene's exact depth, intrinsics and camera-to-world poses in the
`scene` .npz layout that `model.geometry.rgbd.load_scene_npz` reads, so the service rebuilds the very
point maps the renderer made. The renderer keeps world points, not depth: the z-depth of a pixel is
its point's z in that frame's camera, z = r3 · (p − t) with (R, t) the camera-to-world pose and r3
R's third column (OpenCV axes: z forward). This is geometry, so it lives here, not in service/.
"""
from __future__ import annotations

import numpy as np

from model.measure.synthetic import SynthScene


def scene_rgbd(scene: SynthScene) -> dict[str, np.ndarray]:
    """{depth float32 [F,H,W] metres (0 = no surface), intrinsics float32 [F,3,3], poses float32
    [F,4,4] camera-to-world in frame 0's camera, frame_indices int64 [F] (video frame of each map)}."""
    pm = scene.pointmaps
    pts = pm.metric_points().astype(np.float64)  # [F,H,W,3] in metres (scale = 1 for synthetic scenes)
    poses = pm.poses.astype(np.float64)
    forward = poses[:, :3, 2]  # each camera's z axis in world coordinates
    centre = poses[:, :3, 3]
    depth = ((pts - centre[:, None, None, :]) * forward[:, None, None, :]).sum(-1)
    depth = np.where(pm.valid, depth, 0.0).astype(np.float32)
    return {"depth": depth, "intrinsics": pm.intrinsics.astype(np.float32), "poses": pm.poses.astype(np.float32),
            "frame_indices": np.arange(depth.shape[0], dtype=np.int64)}
