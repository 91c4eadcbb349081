"""Schemathesis against the service's own OpenAPI schema (`/openapi.json`), over real HTTP.

Every operation the gateway documents is called with generated (valid and invalid) inputs. The
property is the one that matters for a public endpoint: zero 5xx, zero hangs (each call has a
timeout), and the worker behind the gateway is still alive afterwards; the gateway's own request
counter confirms it answered no 5xx at all. Short by default; SR3D_LONG_TESTS=1 runs up to 1,000
examples per operation and mode (with tests/test_fuzz_upload.py: over 10,000 requests in all).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from service.local_stack import Stack
from tests.faultkit import FAULT_ENV, requests_by_status_class
from tests.test_fuzz_upload import _drain

LONG = os.environ.get("SR3D_LONG_TESTS") == "1"
pytestmark = pytest.mark.timeout(2400 if LONG else 240)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    env = {**FAULT_ENV, "SR3D_DATA_DIR": str(tmp_path_factory.getbasetemp() / "sr3d-faults-data"),
           "SR3D_WAIT_TIMEOUT_S": "2", "SR3D_MAX_UPLOAD_MB": "4", "SR3D_QUEUE_MAX": "100000",
           "SR3D_SSE_PING_S": "1"}
    with Stack(tmp_path_factory.mktemp("fuzz-openapi"), env) as s:
        s.start_redis()
        gw, url = s.start_gateway()
        w, w_url = s.start_worker()
        s.wait_ready(url, gw)
        s.wait_ready(w_url, w)
        yield {"url": url, "gw": gw, "worker": w, "w_url": w_url, "jobs": set()}
    assert s.leaked == []


def _header(response: Any, name: str) -> str:
    value = response.headers.get(name) or ""  # schemathesis keeps every value of a header in a list
    return str(value[0] if isinstance(value, list) and value else value or "")


def test_no_5xx_no_hang_on_any_documented_operation(svc: dict[str, Any]) -> None:
    # The schema only exists once the service runs, so operations are enumerated here rather than
    # at collection (schemathesis.pytest.from_fixture does not work with this pytest 9).
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{svc['url']}/openapi.json")
    failures: list[str] = []
    ran: list[str] = []
    no_negative: list[str] = []
    sent: list[int] = []
    seen: dict[str, set[int]] = {}
    operations = [r.ok() for r in schema.get_all_operations()]
    assert any(op.path == "/v1/spatial-qa" and op.method.upper() == "POST" for op in operations)
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=1000 if LONG else 15, deadline=None, suppress_health_check=list(HealthCheck),
                      derandomize=not LONG, database=None)
            def check(case: Any) -> None:
                response = case.call(base_url=svc["url"], timeout=30)  # a hang fails as a timeout
                sent.append(1)
                job_id = _header(response, "x-sr3d-job-id") or _header(response, "location").rpartition("/")[2]
                if response.status_code < 300 and len(job_id) == 32:
                    svc["jobs"].add(job_id)
                seen.setdefault(f"{op.method.upper()} {op.path}", set()).add(response.status_code)
                if response.status_code >= 500:
                    failures.append(f"{op.method.upper()} {op.path} [{mode.value}] -> {response.status_code} "
                                    f"{response.text[:200]}")

            try:
                check()
            except Unsatisfiable:
                # an operation without inputs (GET /healthz) has no invalid variant to generate
                assert mode == GenerationMode.NEGATIVE, f"{op.method} {op.path}: no valid input could be generated"
                no_negative.append(f"{op.method.upper()} {op.path}")
            ran.append(f"{op.method.upper()} {op.path} [{mode.value}]")
    assert failures == [], failures[:10]
    assert len(ran) == 2 * len(operations)
    print({k: sorted(v) for k, v in seen.items()}, "no negative variant:", no_negative)
    print(f"fuzz requests sent: {len(sent)}")


def test_worker_and_gateway_survived(svc: dict[str, Any]) -> None:
    """Runs last: every job the fuzzer got queued ended (none stuck), and nothing 5xx'd."""
    with httpx.Client(base_url=svc["url"], timeout=30) as http:
        assert _drain(http, sorted(svc["jobs"])) == []
    assert svc["worker"].alive() and svc["gw"].alive()
    assert httpx.get(f"{svc['w_url']}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{svc['url']}/readyz", timeout=5).status_code == 200
    answered = requests_by_status_class(svc["url"])
    print("gateway answered:", answered)
    assert answered.get("5xx", 0) == 0, answered
