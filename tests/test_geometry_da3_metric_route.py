"""The metric route (model/geometry/metric.py): relative point maps put in metres by the DA3 metric model.

Checked against direct computations: a constructed scene whose metric/relative ratio is known, and the
tiny random checkpoints where the factor is recomputed from the networks' raw outputs along another path
(the any-view network's depth at frame size, not the point maps' camera z)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.geometry.da3 import build_tiny_da3
from model.geometry.da3 import preprocess as da3_preprocess
from model.geometry.da3.metric_net import build_tiny_da3_metric, load_da3_metric
from model.geometry.metric import (
    METRIC_NAME,
    MetricDepthModel,
    MetricScaledBackend,
    apply_metric_scale,
    camera_depth,
    metric_scale,
    with_metric_scale,
)
from model.geometry.multiview import MultiViewBackend
from model.geometry.project import finalize
from model.geometry.types import PointMaps


def _rot_y(a: float) -> np.ndarray:
    return np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])


def _scene(frames: int = 3, h: int = 24, w: int = 32) -> tuple[PointMaps, np.ndarray]:
    """Relative point maps of a bumpy surface seen by moving cameras, via the shared `finalize`, and the
    true camera depth of every pixel in that run's (arbitrary) units."""
    rng = np.random.default_rng(0)
    K = np.array([[30.0, 0, (w - 1) / 2], [0, 28.0, (h - 1) / 2], [0, 0, 1]])
    z = 2.0 + rng.uniform(0, 1.5, size=(frames, h, w))
    v, u = np.mgrid[0:h, 0:w]
    cam = np.stack([(u - K[0, 2]) * z / K[0, 0], (v - K[1, 2]) * z / K[1, 1], z], axis=-1)
    poses = np.tile(np.eye(4), (frames, 1, 1))
    for i in range(frames):
        poses[i, :3, :3] = _rot_y(0.2 * i)
        poses[i, :3, 3] = [0.3 * i, -0.1 * i, 0.05 * i]
    pm = finalize(cam, np.ones(z.shape, bool), np.tile(K, (frames, 1, 1)), poses, metric=False, source="relative-test")
    return pm, z


def test_camera_depth_recovers_each_frames_depth():
    pm, z = _scene()
    np.testing.assert_allclose(camera_depth(pm) * pm.scale, z, rtol=1e-5)


def test_factor_is_the_known_ratio_and_ignores_sky_and_outliers():
    pm, z = _scene()
    k = 0.37  # metres per unit of the scene's original units
    metres = (k * z).astype(np.float32)
    not_sky = np.ones(z.shape, bool)
    not_sky[:, :4] = False  # "sky" rows: garbage metric depth there must not count
    metres[:, :4] = 500.0
    metres[0, 10, 10:14] = 80.0  # a few flying pixels: the median does not move
    s = metric_scale(pm, metres, not_sky)
    assert s is not None
    assert s.metres_per_unit == pytest.approx(k * pm.scale, rel=1e-5)
    assert s.frames_used == 3 and s.pixels_used == 3 * 20 * 32
    assert s.spread_frames_rel == pytest.approx(0.0, abs=1e-6)
    scaled = apply_metric_scale(pm, s)
    assert scaled.metric and scaled.source == f"relative-test + {METRIC_NAME}"
    np.testing.assert_array_equal(scaled.points, pm.points)  # geometry unchanged, only its unit
    # In metres the cameras' depths are k times the original ones.
    np.testing.assert_allclose(camera_depth(scaled) * scaled.scale, k * z, rtol=1e-5)
    assert scaled.scale_info["metres_per_unit"] == s.metres_per_unit


def test_spread_across_frames_is_reported():
    pm, z = _scene()
    ks = np.array([1.0, 1.1, 0.9])[:, None, None]
    s = metric_scale(pm, (ks * z).astype(np.float32), np.ones(z.shape, bool))
    assert s.metres_per_unit == pytest.approx(1.0 * pm.scale, rel=1e-5)  # the median frame
    assert s.spread_frames_rel == pytest.approx(0.1, rel=1e-4)
    assert [f / pm.scale for f in s.frame_factors] == pytest.approx([1.0, 1.1, 0.9], rel=1e-5)


def test_no_usable_pixel_gives_no_scale():
    pm, z = _scene()
    assert metric_scale(pm, np.zeros(z.shape, np.float32), np.ones(z.shape, bool)) is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    mv_dir, m_dir = tmp_path_factory.mktemp("da3"), tmp_path_factory.mktemp("da3m")
    build_tiny_da3(mv_dir)
    build_tiny_da3_metric(m_dir)
    return MultiViewBackend(str(mv_dir), device="cpu", process_res=84), MetricDepthModel(str(m_dir), device="cpu", process_res=84)


def test_video_route_is_metric_with_the_metric_models_ratio(tiny):
    mv, metric = tiny
    frames = np.random.default_rng(5).integers(0, 256, size=(3, 60, 80, 3), dtype=np.uint8)
    relative = mv.compute(frames)
    pm = MetricScaledBackend(mv, metric).compute(frames)
    assert pm.metric and not relative.metric
    assert pm.source == "depth-anything-3 + da3-metric"
    np.testing.assert_array_equal(pm.points, relative.points)
    np.testing.assert_array_equal(pm.intrinsics, relative.intrinsics)

    # Direct computation: metric network on the official pre-processing, metres with the predicted focal
    # at network pixels, against the any-view network's own depth at frame size (network units).
    pred = mv.predict(frames)
    u8 = da3_preprocess.resize_frames(frames, 84)
    nh, nw = u8.shape[1:3]
    out = load_da3_metric(metric.model_dir)(da3_preprocess.normalise(u8))
    K = pred["intrinsics"]
    focal = torch.tensor((K[:, 0, 0] * nw / 80 + K[:, 1, 1] * nh / 60) / 2, dtype=torch.float32)[:, None, None]
    metres = F.interpolate((out.depth[0] * focal / 300.0)[:, None], size=(60, 80), mode="bilinear", align_corners=False)[:, 0]
    not_sky = F.interpolate(out.sky[0][:, None], size=(60, 80), mode="bilinear", align_corners=False)[:, 0] < 0.3
    depth = pred["depth"]
    per_frame = []
    for i in range(3):
        m = not_sky[i] & (metres[i] > 0.01) & (depth[i] > 0)
        per_frame.append(float(torch.median((metres[i][m].double() / depth[i][m].double())).item()))
    # metres per network unit x network units per normalised unit = metres per normalised unit.
    expected = float(np.median(per_frame)) * relative.scale
    assert pm.scale == pytest.approx(expected, rel=1e-4)  # torch's lower median vs numpy's mean of the two middle ones
    info = pm.scale_info
    assert info["model"] == "da3-metric" and info["frames_used"] == 3
    assert info["focal_source"] == "predicted by depth-anything-3"
    assert info["spread_frames_rel"] >= 0 and info["pixels_used"] > 0.5 * 3 * 60 * 80


def test_image_route_takes_its_focal_from_da3(tiny, tmp_path):
    from model.geometry import DepthAnythingBackend, build_tiny_depth_model

    mv, metric = tiny
    single = DepthAnythingBackend(build_tiny_depth_model(str(tmp_path / "dav2")), device="cpu")
    routed = with_metric_scale({"multiview": mv, "single": single}, metric)
    image = np.random.default_rng(6).integers(0, 256, size=(1, 56, 70, 3), dtype=np.uint8)
    pm = routed["single"].compute(image)
    assert pm.metric and pm.source == "depth-anything + da3-metric"
    assert pm.scale_info["focal_source"] == "predicted by depth-anything-3"
    np.testing.assert_allclose(pm.intrinsics, mv.predict(image)["intrinsics"], rtol=1e-5)
    # Without the multi-view model the single route says its focal is the default guess.
    alone = MetricScaledBackend(single, metric).compute(image)
    assert alone.metric and "default field of view" in alone.scale_info["focal_source"]


def test_service_wiring_unset_means_relative(tmp_path):
    from service.pipeline import make_pointmap_backend
    from service.settings import Settings

    d = tmp_path / "metric"
    build_tiny_da3_metric(d)
    plain = make_pointmap_backend(Settings(data_dir=str(tmp_path), device="cpu", multiview_process_res=56))
    assert isinstance(plain.get("multiview"), MultiViewBackend)  # no metric model: today's behaviour
    routed = make_pointmap_backend(Settings(data_dir=str(tmp_path), device="cpu", multiview_process_res=56, metric_model=str(d)))
    assert isinstance(routed.get("multiview"), MetricScaledBackend) and isinstance(routed.get("single"), MetricScaledBackend)
    frames = np.random.default_rng(7).integers(0, 256, size=(2, 42, 56, 3), dtype=np.uint8)
    assert not plain.get("multiview").compute(frames).metric
    assert routed.get("multiview").compute(frames).metric
