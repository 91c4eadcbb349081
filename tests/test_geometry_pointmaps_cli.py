"""`sr3d pointmaps`: the worker's decode -> backend -> canonical path, end to end through the CLI."""
from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
from PIL import Image

from model.geometry import pointmaps_from_rgbd
from service.cli import main


def _video(path: Path, n: int, w: int, h: int) -> None:
    out = av.open(str(path), "w")
    s = out.add_stream("libx264", rate=10)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    for i in range(n):
        for p in s.encode(av.VideoFrame.from_ndarray(np.full((h, w, 3), 40 * i, np.uint8), format="rgb24")):
            out.mux(p)
    for p in s.encode():
        out.mux(p)
    out.close()


def test_rgbd_scene_through_cli(tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    _video(video, 5, 32, 24)
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.5, 3.0, (2, 24, 32)).astype(np.float32)
    K = np.array([[30.0, 0, 15.5], [0, 30.0, 11.5], [0, 0, 1]])
    poses = np.stack([np.eye(4)] * 2)
    poses[1, :3, 3] = [0.1, 0.0, 0.2]
    scene = tmp_path / "scene.npz"
    np.savez(scene, depth=depth, intrinsics=K, poses=poses, frame_indices=np.array([1, 3]))
    out, ply = tmp_path / "out.npz", tmp_path / "out.ply"
    assert main(["pointmaps", str(video), "--out", str(out), "--ply", str(ply), "--rgbd", str(scene)]) == 0
    z = np.load(out)
    expected = pointmaps_from_rgbd(depth, K, poses)
    assert list(z["frame_indices"]) == [1, 3] and z["frames"].shape == (2, 24, 32, 3)
    assert abs(int(z["frames"][1].mean()) - 120) < 6  # frame 3 is the one decoded second
    np.testing.assert_allclose(z["points"], expected.points, atol=1e-6)
    assert bool(z["metric"]) and float(z["scale"]) == expected.scale
    head = ply.read_bytes()
    assert head.startswith(b"ply\nformat binary_little_endian 1.0\n")
    n = int(head.split(b"element vertex ")[1].split(b"\n")[0])
    assert n == 2 * 24 * 32 and len(head) == head.index(b"end_header\n") + 11 + n * 15


def test_image_with_tiny_depth_model_and_bad_input(tmp_path: Path, capsys) -> None:
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 42, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "a.npz"
    assert main(["pointmaps", str(img), "--out", str(out), "--device", "cpu"]) == 0
    z = np.load(out)
    assert z["points"].shape == (1, 28, 42, 3) and np.isfinite(z["points"]).all() and not bool(z["metric"])
    bad = tmp_path / "b.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    assert main(["pointmaps", str(bad), "--out", str(tmp_path / "b.npz")]) == 2
    assert "unsupported_container" in capsys.readouterr().err
