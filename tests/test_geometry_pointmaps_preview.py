"""`sr3d pointmaps` with the backend choice: a video goes through the multi-view backend by default,
and the registered cloud comes out as PLY plus a PNG preview (top and side views, cameras drawn)."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image

from model.geometry import pointmaps_from_rgbd
from service.cli import main
from service.commands.cloud_preview import render_preview

DATA = Path(__file__).parent / "data"
RED, BLUE = (230, 0, 0), (0, 90, 255)


def _tum_video(path: Path) -> np.ndarray:
    frames = np.stack([np.asarray(Image.open(DATA / "rgbd" / "color" / f"{i}.png").convert("RGB"))
                       for i in ("0000", "0003", "0006", "0009")])
    out = av.open(str(path), "w")
    s = out.add_stream("libx264", rate=5)
    s.width, s.height, s.pix_fmt = 640, 480, "yuv420p"
    for fr in frames:
        for p in s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
            out.mux(p)
    for p in s.encode():
        out.mux(p)
    out.close()
    return frames


def _count(img: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int((img == np.array(colour, np.uint8)).all(-1).sum())


def test_video_defaults_to_multiview_and_writes_ply_and_preview(tmp_path: Path, capsys) -> None:
    video = tmp_path / "tum.mp4"
    _tum_video(video)
    out, ply = tmp_path / "o.npz", tmp_path / "o.ply"
    assert main(["pointmaps", str(video), "--out", str(out), "--ply", str(ply), "--device", "cpu", "--frames", "4",
                 "--max-side", "160"]) == 0
    assert "backend multiview (depth-anything-3), 4/4 frames registered" in capsys.readouterr().out
    z = np.load(out)
    assert str(z["backend"]) == "multiview" and int(z["frames_registered"]) == 4
    np.testing.assert_allclose(z["poses"][0], np.eye(4), atol=1e-6)
    head = ply.read_bytes()
    assert head.startswith(b"ply\n") and int(head.split(b"element vertex ")[1].split(b"\n")[0]) == int(z["valid"].sum())
    png = np.asarray(Image.open(tmp_path / "o.png").convert("RGB"))
    assert png.shape == (550, 1032, 3)
    assert _count(png, RED) > 10 and _count(png, BLUE) > 10  # camera 0 and the others, in both views
    for panel in (png[46:526, 24:504], png[46:526, 528:1008]):
        assert (panel.min(-1) < 200).mean() > 0.05  # the cloud is drawn in both views


def test_preview_places_points_and_cameras_where_they_are(tmp_path: Path) -> None:
    """A known RGB-D scene: a wall 2 m in front of camera 0, camera 1 one metre to its right. In the top
    view the wall is a horizontal line above the cameras and camera 1 is right of camera 0; in the
    side view the wall is a vertical line right of them."""
    h, w = 24, 32
    K = np.array([[30.0, 0, 15.5], [0, 30.0, 11.5], [0, 0, 1]])
    poses = np.stack([np.eye(4)] * 2)
    poses[1, 0, 3] = 1.0
    depth = np.full((2, h, w), 2.0)
    pm = pointmaps_from_rgbd(depth, K, poses)
    colours = np.full((2, h, w, 3), (0, 160, 0), np.uint8)
    render_preview(pm.points, colours, pm.valid, pm.poses, str(tmp_path / "p.png"))
    img = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    top, side = img[46:526, 24:504], img[46:526, 528:1008]
    for panel, wall_is_row in ((top, True), (side, False)):
        green = np.argwhere((panel == (0, 160, 0)).all(-1))
        red = np.argwhere((panel == RED).all(-1))
        assert len(green) and len(red)
        if wall_is_row:  # wall: thin in rows, above camera 0 (smaller row index)
            assert np.ptp(green[:, 0]) <= 3 and green[:, 0].mean() < red[:, 0].mean() - 50
            blue = np.argwhere((panel == BLUE).all(-1))
            assert blue[:, 1].mean() > red[:, 1].mean() + 50  # camera 1 right of camera 0
        else:  # wall: thin in columns, right of the cameras
            assert np.ptp(green[:, 1]) <= 3 and green[:, 1].mean() > red[:, 1].mean() + 50
