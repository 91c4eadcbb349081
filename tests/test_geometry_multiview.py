"""The multi-view backend (Depth Anything 3 port, tiny random weights) on real TUM RGB-D frames, the
backend choice, and the worker's pipeline routing videos to it.

Random weights say nothing about geometric accuracy (the parity test covers the network); these
tests check what the backend promises whatever the weights: all frames in one canonical frame
(reference = frame 0), points that re-project onto their own pixels through the reported poses and
intrinsics, the median distance normalised to 1, and the route each input takes.
"""
from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import numpy as np
import pytest

from service.api.errors import status_for
import torch
from PIL import Image

from model.geometry import SceneError
from model.geometry.multiview import MultiViewBackend, network_size
from model.geometry.routes import choose_route

DATA = Path(__file__).parent / "data"
TUM_FRAMES = ("0000", "0003", "0006", "0009")  # fr1_rpy: the camera rolls/pitches/yaws between them


@pytest.fixture(scope="module")
def tum_frames() -> np.ndarray:
    return np.stack([np.asarray(Image.open(DATA / "rgbd" / "color" / f"{i}.png").convert("RGB")) for i in TUM_FRAMES])


@pytest.fixture(scope="module")
def backend() -> MultiViewBackend:
    torch.set_num_threads(1)
    return MultiViewBackend(device="cpu", process_res=126)  # tiny random DA3, small network input


def test_network_size_keeps_aspect_in_patch_multiples() -> None:
    assert network_size(480, 640, 504) == (378, 504)
    assert network_size(360, 640, 504) == (280, 504)
    assert network_size(10, 1000, 126) == (14, 126)  # never below one patch


def test_tum_frames_share_one_canonical_frame(backend: MultiViewBackend, tum_frames: np.ndarray) -> None:
    pm = backend.compute(tum_frames)
    f, h, w, _ = tum_frames.shape
    assert pm.points.shape == (f, h, w, 3) and pm.valid.shape == (f, h, w)
    assert pm.intrinsics.shape == (f, 3, 3) and pm.poses.shape == (f, 4, 4)
    assert pm.source == "depth-anything-3" and pm.metric is False
    assert np.isfinite(pm.points).all() and pm.valid.mean() > 0.99
    np.testing.assert_allclose(pm.poses[0], np.eye(4), atol=1e-6)  # canonical frame = camera 0
    R = pm.poses[:, :3, :3].astype(np.float64)
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-5)
    assert np.abs(pm.poses[1:, :3, 3]).max() > 1e-4  # the network put the other cameras somewhere else
    norms = np.linalg.norm(pm.points[pm.valid], axis=-1)
    assert abs(np.median(norms) - 1.0) < 1e-3  # scale-normalised

    # Every frame's points, taken back into its own camera by its pose, project onto their pixels.
    v, u = np.mgrid[0:h, 0:w]
    for i in range(f):
        T = np.linalg.inv(pm.poses[i].astype(np.float64))
        cam = pm.points[i].astype(np.float64) @ T[:3, :3].T + T[:3, 3]
        ok = pm.valid[i] & (cam[..., 2] > 1e-6)
        proj = cam[ok] @ pm.intrinsics[i].astype(np.float64).T
        np.testing.assert_allclose(proj[:, 0] / proj[:, 2], u[ok], atol=2e-2)
        np.testing.assert_allclose(proj[:, 1] / proj[:, 2], v[ok], atol=2e-2)


def test_poses_are_the_network_cameras_relative_to_frame_0(backend: MultiViewBackend, tum_frames: np.ndarray) -> None:
    pred = backend.predict(tum_frames)
    pm = backend.compute(tum_frames)
    rel = np.linalg.inv(pred["c2w"][0]) @ pred["c2w"]
    np.testing.assert_allclose(pm.poses[:, :3, :3], rel[:, :3, :3], atol=1e-5)
    np.testing.assert_allclose(pm.poses[:, :3, 3] * pm.scale, rel[:, :3, 3], atol=1e-5)
    # Intrinsics come back in frame pixels: the network saw 168x126, the frames are 640x480.
    np.testing.assert_allclose(pm.intrinsics, pred["intrinsics"], rtol=1e-6)
    assert abs(pred["intrinsics"][0, 0, 2] - 320) < 3 and abs(pred["intrinsics"][0, 1, 2] - 240) < 3


def test_given_intrinsics_replace_the_predicted_ones(backend: MultiViewBackend, tum_frames: np.ndarray) -> None:
    K = np.array([[517.3, 0, 318.6], [0, 516.5, 255.3], [0, 0, 1]])
    pm = backend.compute(tum_frames[:2], K)
    np.testing.assert_allclose(pm.intrinsics, np.broadcast_to(K, (2, 3, 3)), rtol=1e-6)
    cam0 = pm.points[0][pm.valid[0]]
    v, u = np.mgrid[0:480, 0:640]
    np.testing.assert_allclose(517.3 * cam0[:, 0] / cam0[:, 2] + 318.6, u[pm.valid[0]], atol=2e-2)


def test_compute_many_keeps_requests_apart(backend: MultiViewBackend, tum_frames: np.ndarray) -> None:
    small = tum_frames[:, ::4, ::4].copy()
    a, b = backend.compute_many([small[:2], small[1:]], [None, None])
    assert len(a.points) == 2 and len(b.points) == 3
    np.testing.assert_allclose(a.points, backend.compute(small[:2]).points, atol=1e-5)


@pytest.mark.parametrize(
    "setting,is_video,depth,poses,route",
    [
        ("auto", True, False, False, "multiview"),
        ("auto", False, False, False, "single"),
        ("auto", True, True, True, "rgbd"),
        ("auto", True, True, False, "pose_recovery"),
        ("auto", False, True, False, "pose_recovery"),
        ("single", True, False, False, "single"),
        ("multiview", False, True, True, "multiview"),  # forced: the scene is ignored
        ("rgbd", True, True, True, "rgbd"),
        ("pose_recovery", True, True, True, "pose_recovery"),
    ],
)
def test_route_choice(setting: str, is_video: bool, depth: bool, poses: bool, route: str) -> None:
    assert choose_route(setting, is_video=is_video, scene_depth=depth, scene_poses=poses) == route


@pytest.mark.parametrize("setting,depth,poses", [("rgbd", False, False), ("rgbd", True, False), ("pose_recovery", False, False)])
def test_forced_scene_backend_without_a_scene_is_a_coded_422(setting: str, depth: bool, poses: bool) -> None:
    with pytest.raises(SceneError) as e:
        choose_route(setting, is_video=True, scene_depth=depth, scene_poses=poses)
    assert e.value.code == "backend_needs_scene" and status_for(e.value.code) == 422


# ---- the worker's pipeline -------------------------------------------------------------------------


def _pipeline(tmp_path: Path, **overrides):
    from service.blobs import DirBlobStore
    from service.pipeline import Pipeline, make_pointmap_backend
    from service.settings import Settings

    settings = Settings(data_dir=tmp_path, device="cpu", num_frames=4, **overrides)
    blobs = DirBlobStore(tmp_path / "blobs", settings.max_upload_bytes)
    return Pipeline(settings, blobs, make_pointmap_backend(settings)), blobs


def _run_job(pipeline, blobs, kind: str, data: bytes, filename: str, scene: bytes | None = None):
    from service.schemas import JobSpec

    stages: dict[str, dict] = {}

    async def on_stage(stage: str, info: dict) -> None:
        stages[stage] = info

    async def go():
        await blobs.put("j/media", data)
        if scene is not None:
            await blobs.put("j/scene", scene)
        job = JobSpec(job_id="j", media_kind=kind, media_blob="j/media", media_hash=f"h{len(data)}", media_filename=filename,
                      question="where?", scene_blob="j/scene" if scene is not None else None, created_at=time.time())
        return await pipeline.build(job, on_stage)

    return asyncio.run(go()), stages


def test_worker_pipeline_routes_videos_to_multiview_and_images_to_single(tmp_path: Path) -> None:
    pipeline, blobs = _pipeline(tmp_path)
    video = (DATA / "video" / "intel_bottles_tabletop_8s.mp4").read_bytes()
    query, stages = _run_job(pipeline, blobs, "video", video, "clip.mp4")
    info = stages["pointmaps"]
    assert info["backend"] == "multiview" and info["source"] == "depth-anything-3"
    assert info["frames_registered"] == 4 == len(query.frames)
    assert query.pointmaps.shape == (*query.frames.shape[:3], 3)
    _, again = _run_job(pipeline, blobs, "video", video, "clip.mp4")  # second question: cached maps
    assert again["pointmaps"]["source"] == "depth-anything-3 (cached)" and again["pointmaps"]["backend"] == "multiview"

    buf = io.BytesIO()
    Image.open(DATA / "rgbd" / "color" / "0000.png").save(buf, format="PNG")
    query, stages = _run_job(pipeline, blobs, "image", buf.getvalue(), "desk.png")
    assert stages["pointmaps"]["backend"] == "single" and stages["pointmaps"]["source"] == "depth-anything"
    assert stages["pointmaps"]["frames_registered"] == 1


def test_worker_pipeline_forced_single_view_for_video(tmp_path: Path) -> None:
    pipeline, blobs = _pipeline(tmp_path, pointmap_backend="single")
    video = (DATA / "video" / "intel_bottles_tabletop_8s.mp4").read_bytes()
    _, stages = _run_job(pipeline, blobs, "video", video, "clip.mp4")
    assert stages["pointmaps"]["backend"] == "single" and stages["pointmaps"]["source"] == "depth-anything"


def test_scene_without_poses_takes_the_pose_recovery_route(tmp_path: Path) -> None:
    """Depth + intrinsics but no poses -> pose recovery (model/geometry/pose_recovery.py, branch i13b).
    Where that module is not present the job fails with a coded client error instead of guessing."""
    import importlib.util
    import json

    from model.geometry import SceneError

    pipeline, blobs = _pipeline(tmp_path)
    cams = json.loads((DATA / "rgbd" / "cameras.json").read_text())
    depth = np.asarray(Image.open(DATA / "rgbd" / "depth" / "0000.png"), dtype=np.uint16)[None]
    buf = io.BytesIO()
    np.savez(buf, depth=depth, depth_scale=np.float32(5000), intrinsics=np.asarray(cams["intrinsics"]["K"]))
    png = io.BytesIO()
    Image.open(DATA / "rgbd" / "color" / "0000.png").save(png, format="PNG")
    if importlib.util.find_spec("model.geometry.pose_recovery") is None:
        with pytest.raises(SceneError) as e:
            _run_job(pipeline, blobs, "image", png.getvalue(), "desk.png", scene=buf.getvalue())
        assert e.value.code == "pose_recovery_unavailable"
    else:
        _, stages = _run_job(pipeline, blobs, "image", png.getvalue(), "desk.png", scene=buf.getvalue())
        assert stages["pointmaps"]["backend"] == "pose_recovery" and stages["pointmaps"]["frames_registered"] == 1


def test_worker_job_reports_the_multiview_backend(tmp_path: Path, redis_url: str) -> None:
    """A real worker (Redis queue, torch engine, tiny weights) on a video job: the `pointmaps` progress
    event and the finished job's timings name the backend that ran and the frames it registered."""
    from service.schemas import JobStatus
    from tests.test_worker_loop import Harness, _run

    async def body(h: Harness) -> None:
        h.start()
        spec = await h.submit(max_tokens=4)
        view = await h.wait_terminal(spec.job_id)
        assert view.status == JobStatus.done
        events = await h.jobs.events.range(spec.job_id)
        pm = next(e.data for e in events if e.type == "progress" and e.data["stage"] == "pointmaps")
        assert pm["backend"] == "multiview" and pm["source"] == "depth-anything-3" and pm["frames_registered"] == 4
        assert view.timings["pointmaps_backend"] == "multiview" and view.timings["pointmaps_frames_registered"] == 4
        assert events[-1].data["timings"]["pointmaps_backend"] == "multiview"

    _run(tmp_path, redis_url, body)
