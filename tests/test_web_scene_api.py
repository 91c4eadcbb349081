"""The page's routes and the scene endpoint on a real gateway + real Redis (no worker: the scene is
stored through Jobs.scenes.put, the call the worker makes once the point maps exist)."""
from __future__ import annotations

import asyncio

import httpx
import redis as redis_sync

from model.geometry.scene_export import unpack_scene
from service.jobs import Jobs
from service.keys import scene_key
from service.redis_conn import redis_client
from service.settings import Settings
from tests.conftest import run_gateway
from tests.test_geometry_scene_export import _scene
from tests.test_gateway_api import image_form, post

KEYS = {"X-API-Key": "key-one"}


def _store_and_finish(redis_url: str, job_id: str, data: bytes) -> None:
    async def go() -> None:
        r = redis_client(redis_url)
        q = Jobs(r, Settings(redis_url=redis_url, job_ttl_s=120))
        try:
            await q.scenes.put(job_id, data)
            await q.terminal.finish(job_id, "done", {"answer": "ok"})
        finally:
            await q.aclose()
            await r.aclose()

    asyncio.run(go())


def test_scene_is_owner_only_binary_and_expires_with_the_job(redis_url: str) -> None:
    from model.geometry.scene_export import pack_scene

    frames, points, valid, poses, K = _scene()
    data = pack_scene(frames, points, valid, [], poses, K, [0, 1, 2], max_points=500)
    with run_gateway(redis_url, api_keys=["key-one", "key-two"], job_ttl_s=120) as base:
        r = post(base, headers=KEYS, **image_form())
        assert r.status_code == 202, r.text
        job = r.json()["job_id"]
        url = f"{base}/v1/spatial-qa/{job}/scene"
        early = httpx.get(url, headers=KEYS)
        assert early.status_code == 404 and early.json()["error"]["code"] == "scene_not_ready"

        _store_and_finish(redis_url, job, data)
        got = httpx.get(url, headers=KEYS)
        assert got.status_code == 200 and got.headers["content-type"] == "application/vnd.sr3d.scene"
        assert got.content == data and len(unpack_scene(got.content).positions) == 500
        other = httpx.get(url, headers={"X-API-Key": "key-two"})
        assert other.status_code == 404 and other.json()["error"]["code"] == "job_not_found"
        assert httpx.get(url).status_code == 401
        assert httpx.get(f"{base}/v1/spatial-qa/{'0' * 32}/scene", headers=KEYS).status_code == 404
        assert httpx.get(f"{base}/v1/spatial-qa/not-an-id/scene", headers=KEYS).json()["error"]["code"] == "job_not_found"
    ttl = redis_sync.Redis.from_url(redis_url).ttl(scene_key(job))
    assert 0 < ttl <= 120  # finish() gave it the job's TTL, like the job hash and events


def test_page_and_static_files_are_served_with_a_strict_csp(redis_url: str) -> None:
    with run_gateway(redis_url, api_keys=["key-one"]) as base:
        page = httpx.get(f"{base}/")  # the page itself is public: it holds no data, it asks for a key
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert '<script type="module" src="/web/app.js">' in page.text
        js = httpx.get(f"{base}/web/viewer.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        for bad in ("/web/nope.js", "/web/..%2Fgateway.py", "/web/%2e%2e%2fpage.py"):
            r = httpx.get(base + bad)
            assert r.status_code == 404 and "error" in r.json(), bad
        assert "/v1/spatial-qa/{job_id}/scene" in httpx.get(f"{base}/openapi.json").json()["paths"]
        assert "/" not in httpx.get(f"{base}/openapi.json").json()["paths"]
