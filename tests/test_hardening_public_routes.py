"""Issue 30 item 11 over real HTTP: with API keys on, /metrics needs a key unless SR3D_METRICS_PUBLIC
opens it, /docs and /openapi.json are open unless SR3D_DOCS_PUBLIC closes them, and probes stay open."""
from __future__ import annotations

import httpx
import pytest

from tests.conftest import run_gateway

pytestmark = pytest.mark.timeout(60)

KEY = "sk-public-routes"


def test_metrics_closed_and_docs_open_by_default_with_keys_on(redis_url: str) -> None:
    with run_gateway(redis_url, api_keys=[KEY]) as base:
        r = httpx.get(f"{base}/metrics")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and "sr3d_http_requests_total" in ok.text
        assert httpx.get(f"{base}/openapi.json").status_code == 200
        assert httpx.get(f"{base}/docs").status_code == 200
        assert httpx.get(f"{base}/healthz").status_code == 200 and httpx.get(f"{base}/readyz").status_code == 200


def test_the_operator_can_open_metrics_and_close_docs(redis_url: str) -> None:
    with run_gateway(redis_url, api_keys=[KEY], metrics_public=True, docs_public=False) as base:
        assert httpx.get(f"{base}/metrics").status_code == 200
        for path in ("/openapi.json", "/docs"):
            assert httpx.get(f"{base}{path}").status_code == 401, path
            assert httpx.get(f"{base}{path}", headers={"X-API-Key": KEY}).status_code == 200, path


def test_without_keys_everything_stays_open(redis_url: str) -> None:
    with run_gateway(redis_url) as base:
        for path in ("/metrics", "/openapi.json", "/docs"):
            assert httpx.get(f"{base}{path}").status_code == 200, path
