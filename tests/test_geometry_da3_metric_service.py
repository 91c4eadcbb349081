"""The metric route through the real service (`sr3d serve`: HTTP on loopback, embedded Redis, the worker):
with SR3D_METRIC_MODEL set (here the tiny random DA3 metric checkpoint: its metres are not real metres,
the wiring is what is tested), a plain image without RGB-D is measured in metres, the `pointmaps` event
says how the scale was found, and the measurements name both models."""
from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.e2e_helpers import SERVE_ENV, run
from tests.test_measured_service import stream_job

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from service.local_stack import serve_stack
    from model.geometry.da3.metric_net import build_tiny_da3_metric

    metric_dir = tmp_path_factory.mktemp("da3-metric")
    build_tiny_da3_metric(metric_dir)
    env = {**SERVE_ENV, "SR3D_METRIC_MODEL": str(metric_dir), "SR3D_MULTIVIEW_PROCESS_RES": "112"}
    with serve_stack(tmp_path_factory.mktemp("serve-metric"), env) as (_, url):
        yield url


async def ask_image(url: str) -> list[Any]:
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(png, format="PNG")
    regions = [[{"frame": 0, "box": [20, 40, 60, 80]}], [{"frame": 0, "box": [100, 30, 140, 90]}]]
    data = {"question": "How far is <region0> from <region1>?", "regions": json.dumps(regions),
            "options": json.dumps({"answer_mode": "measured"})}
    return await stream_job(url, data, [("image", ("i.png", png.getvalue(), "image/png"))])


def test_plain_image_is_measured_in_metres_through_the_metric_model(service: str) -> None:
    events = run(ask_image(service))
    pointmaps = next(e.data for e in events if e.type == "progress" and e.data["stage"] == "pointmaps")
    assert pointmaps["backend"] == "single"
    assert pointmaps["source"] == "depth-anything + da3-metric"
    scale = pointmaps["metric_scale"]
    assert scale["model"] == "da3-metric" and scale["metres_per_unit"] > 0 and scale["frames_used"] == 1
    assert scale["focal_source"] == "predicted by depth-anything-3"  # auto loads DA3: its focal, not a guess
    assert scale["spread_pixels_rel"] >= 0

    m = events[-1].data["measurements"]
    assert m["scale"] == "metric" and m["unit"] == "m"
    assert m["source"] == "depth-anything + da3-metric (metric)"
    pair = m["pairs"][0]
    assert pair["center_distance"]["unit"] == "m" and pair["center_distance"]["value"] > 0
    view = httpx.get(f"{service}/v1/spatial-qa/{events[-1].data['job_id']}", timeout=10).json()
    assert view["progress"]["stages"]["pointmaps"]["metric_scale"] == scale
