"""(b) The service end to end with SR3D_ENGINE=vllm: embedded Redis + gateway + worker (`sr3d serve`) on this
machine, the tiny checkpoint on vLLM, one streamed job over real HTTP/SSE."""
from __future__ import annotations

from pathlib import Path

import pytest

from service.client import SR3DClient
from service.local_stack import Stack
from tests.e2e_helpers import SERVE_ENV, assert_clean_stream, bottle_request, run

VLLM_ENV = {
    **SERVE_ENV,
    "SR3D_ENGINE": "vllm",
    "SR3D_DEVICE": "cuda",
    "SR3D_NUM_FRAMES": "8",
    "SR3D_VLLM_ENFORCE_EAGER": "1",
    "SR3D_VLLM_GPU_MEMORY_UTILIZATION": "0.3",
    "SR3D_LOG_LEVEL": "INFO",
}


@pytest.mark.timeout(600)
def test_streamed_job_through_vllm_engine(tmp_path: Path) -> None:
    with Stack(tmp_path, VLLM_ENV) as st:
        proc, url = st.start_serve()
        st.wait_ready(url, proc, timeout=420)

        async def go() -> None:
            async with SR3DClient(url) as c:
                res = await c.run(bottle_request(max_tokens=16))
                assert res.http_status == 200, res.error_body
                assert_clean_stream(res)
                types = [e.type for e in res.events]
                assert types[0] == "queued" and types[-1] == "done", types
                assert "token" in types
                done = res.events[-1].data
                assert done["answer"] == res.answer_from_tokens
                assert done["usage"]["prompt_tokens"] > 8 * 121  # 8 frames x 121 visual tokens, expanded by vLLM
                assert done["finish_reason"] in ("stop", "length")
            metrics = __import__("httpx").get(f"{url}/metrics", timeout=5).text
            assert "sr3d_generation_tokens_total" in metrics

        run(go())
