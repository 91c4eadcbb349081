"""Issue 30 item 2 over real HTTP and a real Redis: one uploaded PNG referenced as the mask of every
region on every annotation is opened and stored once (it was copied to temp disk once per reference,
64 x 8 MiB, before the total-size check refused the request), and the distinct files a request
references are sized from their metadata before any is copied."""
from __future__ import annotations

import httpx
import pytest
import redis as redis_sync

from tests.conftest import run_gateway
from tests.test_openai_api import image_msg, png_bytes

pytestmark = pytest.mark.timeout(120)

KEY = "sk-mask-refs"
AUTH = {"Authorization": f"Bearer {KEY}"}


def upload(base: str, data: bytes) -> str:
    r = httpx.post(f"{base}/v1/files", headers=AUTH, files={"file": ("m.png", data, "image/png")},
                   data={"purpose": "vision"}, timeout=30)
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def test_one_file_referenced_sixteen_times_is_stored_once(redis_url: str) -> None:
    with run_gateway(redis_url, api_keys=[KEY], max_upload_mb=2, max_regions=4, max_masks_per_region=4,
                     wait_timeout_s=1) as base:
        mask_id = upload(base, png_bytes() + b"\0" * (1024 * 1024))  # 1 MiB; 16 references = 16 MiB > 3 MiB
        image_id = upload(base, png_bytes())
        regions = [[{"frame": 0, "mask": f"sr3d-media://{mask_id}"}] * 4 for _ in range(4)]
        body = {"model": "sr3d", "max_tokens": 4, "regions": regions,
                "messages": image_msg(f"sr3d-media://{image_id}", "<region0> <region1> <region2> <region3>?")}
        r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=AUTH, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "job_timeout", r.text  # queued; no worker here
        job_id = r.headers["X-SR3D-Job-Id"]
        client = redis_sync.Redis.from_url(redis_url)
        try:
            masks = list(client.scan_iter(f"sr3d:blob:{job_id}/mask/*"))
        finally:
            client.close()
        assert len(masks) == 1, masks

        # Two distinct files over the cap together: 413, decided from their stored sizes.
        other = upload(base, png_bytes() + b"\0" * (1536 * 1024))
        third = upload(base, png_bytes() + b"\1" * (1536 * 1024))
        body["regions"] = [[{"frame": 0, "mask": f"sr3d-media://{other}"}], [{"frame": 0, "mask": f"sr3d-media://{third}"}]]
        body["messages"] = image_msg(f"sr3d-media://{image_id}", "<region0> <region1>?")
        r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=AUTH, timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large", r.text
