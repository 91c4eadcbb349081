"""Measured answers through the real service (`sr3d serve`: HTTP on loopback, embedded Redis, the
worker with the tiny demo model): the `measure` stage, `measurements` in `done`, GET and the OpenAI
route, the three answer modes, and `scale_hint` checked at submit.

Ground truth is made here: a flat wall 2 m in front of a pinhole camera (f = 100 px) sent as an exact
RGB-D scene, with two boxes drawn on it. A box's pixels span `px * depth / f` metres on the wall, so
the boxes' widths, heights and the distance between their centres are known in closed form.
"""
from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.client import iter_sse
from tests.e2e_helpers import SERVE_ENV, run

pytestmark = pytest.mark.timeout(600)

W, H, F, DEPTH_M = 160, 120, 100.0, 2.0
CX, CY = W / 2, H / 2
BOX_A = [20, 40, 60, 80]  # x0, y0, x1, y1 (pixels; x1, y1 exclusive edges)
BOX_B = [100, 30, 140, 90]
QUESTION = "How far is <region0> from <region1>?"


def metres(px: float) -> float:
    return px * DEPTH_M / F


# Closed form: width/height of a box on the wall, distance between the two boxes' centres.
A_WIDTH, B_HEIGHT = metres(BOX_A[2] - BOX_A[0]), metres(BOX_B[3] - BOX_B[1])
CENTRE_DISTANCE = float(np.hypot(metres((BOX_B[0] + BOX_B[2]) / 2 - (BOX_A[0] + BOX_A[2]) / 2),
                                 metres((BOX_B[1] + BOX_B[3]) / 2 - (BOX_A[1] + BOX_A[3]) / 2)))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from service.local_stack import serve_stack

    with serve_stack(tmp_path_factory.mktemp("serve-measure"), SERVE_ENV) as (_, url):
        yield url


def wall_files(scene: bool = True, seed: int = 0) -> list[tuple[str, tuple[str, bytes, str]]]:
    rng = np.random.default_rng(seed)  # the texture; another seed is another upload (another cache key)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(png, format="PNG")
    files = [("image", ("wall.png", png.getvalue(), "image/png"))]
    if scene:
        npz = io.BytesIO()
        K = np.array([[F, 0, CX], [0, F, CY], [0, 0, 1]], np.float32)
        np.savez(npz, depth=np.full((1, H, W), DEPTH_M, np.float32), intrinsics=K, poses=np.eye(4, dtype=np.float32)[None])
        files.append(("scene", ("wall.npz", npz.getvalue(), "application/octet-stream")))
    return files


def form(question: str = QUESTION, **options: Any) -> dict[str, str]:
    regions = [[{"frame": 0, "box": BOX_A}], [{"frame": 0, "box": BOX_B}]]
    return {"question": question, "regions": json.dumps(regions), "options": json.dumps(options)}


async def ask(url: str, data: dict[str, str], scene: bool = True, seed: int = 0) -> list[Any]:
    return await stream_job(url, data, wall_files(scene, seed))


async def stream_job(url: str, data: dict[str, str], files: list[tuple[str, tuple[str, bytes, str]]]) -> list[Any]:
    """Submit with `Accept: text/event-stream` and read the stream to its terminal event."""
    async with httpx.AsyncClient(base_url=url, timeout=180) as http:
        async with http.stream("POST", "/v1/spatial-qa", data=data, files=files,
                               headers={"Accept": "text/event-stream"}) as r:
            assert r.status_code == 200, (await r.aread()).decode()
            events = []
            async for ev in iter_sse(r):
                events.append(ev)
                if ev.type in ("done", "error"):
                    break
    assert events[-1].type == "done", events[-1].data
    return events


def close(value: float, truth: float, rel: float) -> bool:
    return abs(value - truth) <= rel * abs(truth)


def test_measured_mode_answers_from_exact_depth_in_metres(service: str) -> None:
    events = run(ask(service, form(answer_mode="measured")))
    done = events[-1].data
    stages = [e.data["stage"] for e in events if e.type == "progress"]
    assert stages.index("pointmaps") < stages.index("measure")
    # The text goes out through the same token events a generated answer would.
    assert "".join(e.data["text"] for e in events if e.type == "token") == done["answer"]
    assert done["answer_mode"] == "measured" and done["region_mode"] is None
    assert "demo_model" not in done  # the demo model did not write this text: it is a real answer
    assert done["usage"] == {"prompt_tokens": 0, "completion_tokens": 0}
    assert done["timings"]["measure_s"] >= 0

    m = done["measurements"]
    assert m["scale"] == "metric" and m["unit"] == "m"
    a, b = m["regions"]
    assert a["available"] and b["available"] and a["points_used"] > 0
    assert a["width"]["unit"] == "m" and a["width"]["scale"] == "metric"
    assert close(a["width"]["value"], A_WIDTH, 0.05), (a["width"], A_WIDTH)
    assert close(b["height"]["value"], B_HEIGHT, 0.05), (b["height"], B_HEIGHT)
    pair = m["pairs"][0]
    assert close(pair["center_distance"]["value"], CENTRE_DISTANCE, 0.03), (pair, CENTRE_DISTANCE)
    assert pair["direction"]["left_right"] == "right"  # B is right of A on the wall
    # The text states the distance with its unit.
    said = [float(x) for x in re.findall(r"(\d+(?:\.\d+)?)\s*(?:m|metres|meters)\b", done["answer"])]
    assert any(close(x, CENTRE_DISTANCE, 0.05) for x in said), done["answer"]

    view = httpx.get(f"{service}/v1/spatial-qa/{done['job_id']}", timeout=10).json()
    assert view["answer_mode"] == "measured" and view["measurements"] == m
    assert view["progress"]["stages"]["measure"]["scale"] == "metric"


def test_grounded_mode_puts_the_facts_in_the_prompt(service: str) -> None:
    model = run(ask(service, form(answer_mode="model", max_tokens=2)))[-1].data
    grounded = run(ask(service, form(answer_mode="grounded", max_tokens=2)))[-1].data
    assert model["answer_mode"] == "model" and grounded["answer_mode"] == "grounded"
    # Same media, same question: only the measured facts make the grounded prompt longer.
    assert grounded["usage"]["prompt_tokens"] > model["usage"]["prompt_tokens"] + 10
    assert grounded["measurements"] == model["measurements"]  # measured either way, returned as data
    assert model["demo_model"] and grounded["demo_model"]  # the demo model's text stays flagged


def test_relative_scene_has_no_units_until_a_scale_hint_gives_one(service: str) -> None:
    """No RGB-D: the (tiny, random) depth model gives a relative scene; a scale hint states it in metres."""
    rel = run(ask(service, form(answer_mode="measured"), scene=False))[-1].data
    m = rel["measurements"]
    assert m["scale"] == "relative" and m["unit"] is None
    assert all(r["width"] is None or r["width"]["unit"] is None for r in m["regions"])
    assert not re.search(r"\d\s*(m|metres|meters)\b", rel["answer"]), rel["answer"]

    hint = {"region": 0, "dimension": "width", "metres": 0.5}
    scaled = run(ask(service, form(answer_mode="measured", scale_hint=hint), scene=False))[-1].data
    s = scaled["measurements"]
    assert s["scale"] == "metric" and s["unit"] == "m" and "scale_hint" in s["source"]
    assert close(s["regions"][0]["width"]["value"], 0.5, 0.01)
    # Every length scales by the same factor: ratios are what the relative scene knew.
    ratio = s["regions"][1]["height"]["value"] / s["regions"][0]["width"]["value"]
    assert close(ratio, m["regions"][1]["height"]["value"] / m["regions"][0]["width"]["value"], 0.01)


@pytest.mark.parametrize("hint, why", [
    ({"region": 2, "dimension": "width", "metres": 0.3}, "region"),
    ({"region": 0, "dimension": "width", "metres": 0}, "metres"),
    ({"region": 0, "dimension": "width", "metres": -1.5}, "metres"),
    ({"region": 0, "dimension": "girth", "metres": 0.3}, "dimension"),
])
def test_a_bad_scale_hint_is_refused_at_submit(service: str, hint: dict[str, Any], why: str) -> None:
    def submitted() -> float:
        text = httpx.get(f"{service}/metrics", timeout=10).text
        return sum(float(v) for v in re.findall(r"^sr3d_jobs_submitted_total(?:\{[^}]*\})? (\S+)$", text, re.M))

    before = submitted()
    r = httpx.post(f"{service}/v1/spatial-qa", data=form(answer_mode="measured", scale_hint=hint),
                   files=wall_files(), timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_scale_hint" and why in r.json()["error"]["message"]
    assert submitted() == before  # nothing was queued


def test_non_finite_scale_hint_is_refused(service: str) -> None:
    data = form(answer_mode="measured")
    data["options"] = '{"answer_mode": "measured", "scale_hint": {"region": 0, "dimension": "width", "metres": 1e999}}'
    r = httpx.post(f"{service}/v1/spatial-qa", data=data, files=wall_files(), timeout=30)
    # Refused by the options field's JSON reader, before any model sees it.
    assert r.status_code == 400 and "finite" in r.json()["error"]["message"], r.text


def test_openai_route_returns_measurements_as_an_extension(service: str) -> None:
    import base64

    from openai import OpenAI

    files = dict((name, body) for name, body in wall_files(scene=False))
    png = base64.b64encode(files["image"][1]).decode()
    client = OpenAI(base_url=f"{service}/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(
        model="sr3d", messages=[{"role": "user", "content": [
            {"type": "text", "text": QUESTION},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]}],
        extra_body={"regions": [[{"frame": 0, "box": BOX_A}], [{"frame": 0, "box": BOX_B}]],
                    "answer_mode": "measured", "scale_hint": {"region": 0, "dimension": "width", "metres": 0.8}})
    extra = out.model_extra or {}
    assert extra["answer_mode"] == "measured"
    m = extra["measurements"]
    assert m["scale"] == "metric" and close(m["regions"][0]["width"]["value"], 0.8, 0.01)
    assert out.choices[0].message.content and out.usage.completion_tokens == 0

    stream = client.chat.completions.create(
        model="sr3d", stream=True, messages=[{"role": "user", "content": [
            {"type": "text", "text": QUESTION},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]}],
        extra_body={"regions": [[{"frame": 0, "box": BOX_A}], [{"frame": 0, "box": BOX_B}]], "answer_mode": "measured"})
    chunks = list(stream)
    last = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert (last.model_extra or {})["measurements"]["scale"] == "relative"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed and not re.search(r"\d\s*(m|metres|meters)\b", streamed), streamed  # relative: no units


def test_schema_names_the_measurements(service: str) -> None:
    schema = httpx.get(f"{service}/openapi.json", timeout=10).json()["components"]["schemas"]
    assert {"Measurements", "Length", "RegionMeasurementOut", "PairMeasurementOut"} <= set(schema)
    assert schema["Length"]["required"] == ["value", "unit", "scale"]



def test_grounded_answers_do_not_depend_on_the_point_map_cache(service: str) -> None:
    """The second identical request takes the point maps from the cache: same facts, same prompt,
    same greedy answer (the cache shows in the pointmaps event only)."""
    question = "What is between <region0> and <region1>?"
    first, second = (run(ask(service, form(question, answer_mode="grounded", max_tokens=6), scene=False, seed=7))
                     for _ in range(2))
    pm = [next(e.data for e in events if e.type == "progress" and e.data["stage"] == "pointmaps")
          for events in (first, second)]
    assert "(cached)" in pm[1]["source"] and "(cached)" not in pm[0]["source"]
    a, b = first[-1].data, second[-1].data
    assert a["measurements"] == b["measurements"]
    assert a["usage"] == b["usage"] and a["answer"] == b["answer"]
