"""`sr3d pointmaps` names the depth model that produced its points (issue 28: the demo's tiny random
one looked like a real result), and `sr3d rgbd-npz` turns the shipped tests/data/rgbd folder into the
`--rgbd` scene archive (and a matching video) the CLI and the API's `scene` part take."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.geometry import load_scene_npz
from service.cli import main

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
RGBD = ROOT / "tests" / "data" / "rgbd"


def sr3d(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=240)


def test_rgbd_folder_packs_into_the_scene_archive(tmp_path: Path) -> None:
    p = sr3d("rgbd-npz", str(RGBD), "--out", "scene.npz", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "10 depth frames 640x480, poses" in p.stdout
    data = (tmp_path / "scene.npz").read_bytes()
    scene = load_scene_npz(data)  # the service's own checks
    cams = json.loads((RGBD / "cameras.json").read_text())
    first = np.asarray(Image.open(RGBD / cams["frames"][0]["depth"]), dtype=np.float64) / cams["depth"]["scale"]
    np.testing.assert_allclose(scene.depth[0], first, atol=1e-6)
    np.testing.assert_allclose(scene.poses, [f["T_world_cam"] for f in cams["frames"]])
    np.testing.assert_allclose(scene.intrinsics if scene.intrinsics.ndim == 2 else scene.intrinsics[0],
                               cams["intrinsics"]["K"])
    # Without --video, the depth maps point at the TUM video's frames, as the folder says.
    assert scene.frame_indices.tolist() == [f["video_frame_index_in_tum_fr1_rpy_office_10s_mp4"] for f in cams["frames"]]

    p = sr3d("rgbd-npz", str(RGBD), "--out", "bare.npz", "--no-poses", cwd=tmp_path)
    assert p.returncode == 0 and load_scene_npz((tmp_path / "bare.npz").read_bytes()).poses is None

    p = sr3d("rgbd-npz", str(tmp_path), "--out", "x.npz", cwd=tmp_path)  # no cameras.json here
    assert p.returncode == 2 and "cameras.json" in p.stderr and "Traceback" not in p.stderr


def test_packed_scene_and_video_go_through_pointmaps_and_name_the_depth(tmp_path: Path, capsys) -> None:
    scene, video, out = tmp_path / "fr1.npz", tmp_path / "fr1.mp4", tmp_path / "out.npz"
    assert main(["rgbd-npz", str(RGBD), "--out", str(scene), "--video", str(video)]) == 0
    assert main(["pointmaps", str(video), "--rgbd", str(scene), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    z = np.load(out)
    assert str(z["backend"]) == "rgbd" and int(z["frames_registered"]) == 10 and bool(z["metric"])
    assert z["frame_indices"].tolist() == list(range(10)) and z["frames"].shape == (10, 480, 640, 3)
    assert str(z["depth_model"]) == f"RGB-D depth from {scene}"
    assert f"depth model: RGB-D depth from {scene}: metric" in printed


def test_tiny_demo_depth_model_is_named_as_meaningless(tmp_path: Path, capsys) -> None:
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 42, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "a.npz"
    assert main(["pointmaps", str(img), "--out", str(out), "--device", "cpu", "--backend", "single"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("depth model:")]
    assert line and "tiny random Depth Anything V2 demo model" in line[0]
    assert "not metric, not meaningful" in line[0]
    assert "not meaningful" in str(np.load(out)["depth_model_note"])
