"""Issue 14 items 1, 10 and 12 (strict job specs): the parse rules in service/schemas.py, the
gateway over real HTTP rejecting what the old lax rules let through, and a worker against a real
Redis failing unreadable (poison) specs with a code while valid jobs of the same claim batch run.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from service.api.errors import status_for
from service.errors import ApiError
from service.keys import JOBS, events_key, job_key
from service.schemas import MAX_JSON_DEPTH, GenerationOptions, JobSpec, JobStatus, RegionsInput, parse_json_field
from tests.conftest import run_gateway
from tests.test_gateway_api import image_form
from tests.test_worker_loop import Harness, _run, data_dir  # noqa: F401  (data_dir is a fixture)

pytestmark = pytest.mark.timeout(240)


# ---- parse rules (service/schemas.py) -----------------------------------------------------------


@pytest.mark.parametrize(
    "raw, why",
    [
        ('[{"frame": 0, "box": [0, 0, Infinity, Infinity]}]', "Infinity"),
        ('[{"frame": 0, "box": [0, 0, 1e400, 5]}]', "1e400"),
        ('{"temperature": NaN}', "NaN"),
        ('{"seed": ' + "9" * 5000 + "}", "5000-digit integer"),
        ("[" * 2000 + "]" * 2000, "nested 2000 deep"),
        ('{"a": ' * (MAX_JSON_DEPTH + 1) + "1" + "}" * (MAX_JSON_DEPTH + 1), "one level too deep"),
    ],
)
def test_parse_json_field_rejects_with_400(raw: str, why: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_json_field(raw, "regions", [])
    assert status_for(e.value.code) == 400 and e.value.code == "regions_not_json", why


def test_parse_json_field_accepts_normal_json_and_brackets_in_strings() -> None:
    assert parse_json_field(' [{"frame": 0, "box": [1, 2.5, 3, 4]}] ', "regions", []) == [{"frame": 0, "box": [1, 2.5, 3, 4]}]
    assert parse_json_field('{"mask": "[[[[[[[[[[[[[[[[[[[["}', "regions", []) == {"mask": "[" * 20}
    assert parse_json_field("", "options", {}) == {} and parse_json_field(None, "options", {"d": 1}) == {"d": 1}
    assert parse_json_field('{"seed": 9223372036854775807}', "options", {}) == {"seed": 2**63 - 1}


@pytest.mark.parametrize(
    "regions",
    [
        [{"frame": "3", "box": [0, 0, 5, 5]}],
        [{"frame": True, "box": [0, 0, 5, 5]}],
        [{"frame": 0, "box": [0, 0, "5", 5]}],
        [{"frame": 0, "box": [0, 0, True, 5]}],
        [{"frame": 0, "box": [0, 0, float("inf"), 5]}],
        [{"frame": 1.0, "box": [0, 0, 5, 5]}],
    ],
)
def test_regions_are_strict(regions: Any) -> None:
    with pytest.raises(ValidationError):
        RegionsInput.model_validate({"regions": regions})


@pytest.mark.parametrize(
    "options",
    [{"max_tokens": True}, {"max_tokens": "3"}, {"temperature": 1e-300}, {"temperature": 0.005}, {"top_p": 1e-300},
     {"temperature": float("nan")}, {"seed": "1"}, {"ignore_eos": "yes"}],
)
def test_options_are_strict_and_bounded(options: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        GenerationOptions.model_validate(options)


def test_valid_options_still_accepted() -> None:
    o = GenerationOptions.model_validate({"max_tokens": 3, "temperature": 0.7, "top_p": 0.9, "seed": 1, "ignore_eos": True})
    assert (o.max_tokens, o.temperature, o.top_p) == (3, 0.7, 0.9)
    assert GenerationOptions.model_validate({"temperature": 0, "top_p": 1}).temperature == 0.0  # ints as floats


def test_stored_spec_with_null_box_is_unreadable() -> None:
    """What the old gateway stored for `Infinity` (pydantic writes inf as null) must not validate."""
    raw = _poison_spec_json("x")
    with pytest.raises(ValidationError):
        JobSpec.model_validate_json(raw)


# ---- gateway over real HTTP (no gateway edits: the models it already calls are strict) --------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("regions", '[{"frame": 0, "box": [0, 0, Infinity, Infinity]}]'),
        ("regions", '[{"frame": 0, "box": [0, 0, 1e400, 5]}]'),
        ("regions", '[{"frame": "0", "box": [1, 1, 8, 8]}]'),
        ("regions", '[{"frame": true, "box": [1, 1, 8, 8]}]'),
        ("options", '{"max_tokens": true}'),
        ("options", '{"temperature": 1e-300}'),
        ("options", '{"top_p": 1e-300}'),
    ],
)
def test_gateway_rejects_lax_or_non_finite_input(redis_url: str, field: str, value: str) -> None:
    with run_gateway(redis_url) as base:
        form = image_form(**({"regions": value} if field == "regions" else {"options": value}))
        r = httpx.post(f"{base}/v1/spatial-qa", **form, timeout=30)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["code"] in (f"{field}_invalid", f"{field}_not_json")


# ---- worker: poison specs in the same claim batch as valid jobs ----------------------------------------


def _poison_spec_json(jid: str) -> str:
    # Byte-for-byte what the pre-fix gateway stored for box [0, 0, Infinity, Infinity].
    return json.dumps({
        "job_id": jid, "media_kind": "video", "media_blob": f"{jid}/media", "media_hash": "0" * 64,
        "media_filename": "clip.mp4", "question": "What is <region0>?",
        "regions": [[{"frame": 0, "box": [0.0, 0.0, None, None]}]], "scene_blob": None,
        "options": {"max_tokens": 6, "temperature": 0.0, "top_p": 1.0, "num_frames": 4, "seed": None,
                    "cancel_on_disconnect": False, "ignore_eos": False},
        "created_at": time.time(), "api_key_id": None,
    })


async def _submit_poison(h: Harness) -> str:
    jid = uuid.uuid4().hex
    async with h.redis.pipeline(transaction=True) as pipe:
        pipe.hset(job_key(jid), mapping={"spec": _poison_spec_json(jid), "status": "queued",
                                         "created_at": repr(time.time()), "attempts": 0})
        pipe.xadd(events_key(jid), {"type": "queued", "data": "{}"})
        pipe.xadd(JOBS, {"job_id": jid})
        await pipe.execute()
    return jid


def test_poison_specs_fail_with_code_and_valid_jobs_in_same_batch_run(data_dir: Any, redis_url: str) -> None:  # noqa: F811
    async def body(h: Harness) -> None:
        # poison, valid, poison, valid: with concurrency 2 the first claim batch holds one of each.
        poison, valid = [], []
        for _ in range(2):
            poison.append(await _submit_poison(h))
            valid.append((await h.submit(max_tokens=4)).job_id)
        t0 = time.monotonic()
        h.start()
        for jid in poison:
            view = await h.wait_terminal(jid, timeout=10)
            assert view.status is JobStatus.failed and view.error.code == "invalid_job_spec"
            assert (await h.jobs.events.terminal(jid)).data["code"] == "invalid_job_spec"
        for jid in valid:
            assert (await h.wait_terminal(jid, timeout=60)).status is JobStatus.done
        assert await h.pending_after_ack() == 0
        assert time.monotonic() - t0 < 60  # never the 60 s claim-idle wait per redelivery
        views = await asyncio.gather(*(h.jobs.get(j) for j in poison))
        assert all(v.attempts == 0 for v in views)  # failed at claim time, never started

    _run(data_dir, redis_url, body)


# ---- worker: input errors fail at once (item 6) ----------------------------------------------------


def test_input_errors_fail_at_once_without_retry(data_dir: Any, redis_url: str) -> None:  # noqa: F811
    """A 1x40000 PNG and a scene npz whose shape product overflows int64 were retried 3-4 min."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    async def submit(h: Harness, image: bytes, scene: bytes | None) -> str:
        jid = uuid.uuid4().hex
        await h.blobs.put(f"{jid}/media", image)
        if scene is not None:
            await h.blobs.put(f"{jid}/scene", scene)
        spec = JobSpec.model_validate({
            "job_id": jid, "media_kind": "image", "media_blob": f"{jid}/media", "media_hash": uuid.uuid4().hex,
            "media_filename": "a.png", "question": "What is here?", "created_at": time.time(),
            "scene_blob": f"{jid}/scene" if scene is not None else None, "options": {"max_tokens": 4}})
        await h.jobs.submit(spec)
        return jid

    buf = io.BytesIO()
    Image.new("RGB", (40000, 1)).save(buf, format="PNG")
    thin = buf.getvalue()
    buf = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buf, format="PNG")
    small = buf.getvalue()
    npz = io.BytesIO()
    with zipfile.ZipFile(npz, "w") as zf:
        for name, arr in (("intrinsics", np.eye(3)), ("poses", np.eye(4)[None])):
            with zf.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, arr)
        with zf.open("depth.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (2**40, 2**40, 2**40)})
            f.write(b"\0" * 64)

    async def body(h: Harness) -> None:
        h.start()
        cases = {await submit(h, thin, None): "aspect_ratio_too_large", await submit(h, small, npz.getvalue()): "scene_too_large"}
        for jid, code in cases.items():
            view = await h.wait_terminal(jid, timeout=30)
            assert view.status is JobStatus.failed and view.error.code == code and view.attempts == 1, view
        assert await h.pending_after_ack() == 0

    _run(data_dir, redis_url, body)
