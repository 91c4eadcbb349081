"""End to end with a checkpoint shaped like the public one: `sr3d serve` on the NVILA-Lite-8B replica
(tests/replica.py: real file set and Qwen2 vocabulary, no media tokens in llm/, no SR-3D region modules)
answers a two-region video question in `marks` mode, and says so in `done` and in GET.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from service.client import JobRequest, Media, SR3DClient, box_regions
from service.local_stack import serve_stack
from tests.e2e_helpers import BOTTLE_NAME, SERVE_ENV, assert_clean_stream, find_fixture, run

pytestmark = pytest.mark.timeout(600)

BOXES = [(0, [250.0, 60.0, 330.0, 300.0]), (0, [40.0, 100.0, 160.0, 300.0])]


def test_replica_serves_a_two_region_video_job_in_marks_mode(replica_checkpoint: Path,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    env = {**SERVE_ENV, "SR3D_MODEL": str(replica_checkpoint), "SR3D_REGION_MODE": "auto"}
    with serve_stack(tmp_path_factory.mktemp("serve-replica"), env) as (_, url):
        async def go() -> None:
            async with SR3DClient(url) as c:
                req = JobRequest(Media.from_path(find_fixture(BOTTLE_NAME)), "Is <region0> left of <region1>?",
                                 box_regions(BOXES), options={"max_tokens": 6})
                res = await c.run(req)
                assert res.http_status == 200, res.error_body
                assert_clean_stream(res)
                done = res.events[-1]
                assert done.type == "done", [(e.type, e.data) for e in res.events[-3:]]
                assert done.data["region_mode"] == "marks"
                assert "demo_model" not in done.data  # a checkpoint was given: no demo notice
                # 4 frames x 122 tokens of video + the chat turn (the region phrases are text, no slots)
                assert done.data["usage"]["prompt_tokens"] > 4 * 122
                view = (await c.get(res.job_id)).json()
                assert view["status"] == "done" and view["region_mode"] == "marks"
                assert view["answer"] == done.data["answer"]

        run(go())
