"""One config root: the vLLM knobs are nested in Settings under their SR3D_VLLM_* names, and each
default (max_tokens, frames, drain timeout) comes from one place."""
from __future__ import annotations

import pytest

from service.schemas import GenerationOptions
from service.settings import Settings


def test_vllm_settings_nested_with_their_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().vllm.max_model_len == 8192
    monkeypatch.setenv("SR3D_VLLM_MAX_MODEL_LEN", "4096")
    monkeypatch.setenv("SR3D_VLLM_ENABLE_PREFIX_CACHING", "false")
    monkeypatch.setenv("SR3D_DRAIN_TIMEOUT_S", "90")
    s = Settings()
    assert (s.vllm.max_model_len, s.vllm.enable_prefix_caching, s.drain_timeout_s) == (4096, False, 90)


def test_generation_defaults_come_from_settings_within_caps() -> None:
    s = Settings(default_max_tokens=100, max_tokens=64, num_frames=16, max_frames=8)
    filled = GenerationOptions().with_defaults(s)
    assert (filled.max_tokens, filled.num_frames) == (64, 8)  # a default never exceeds its cap
    assert GenerationOptions(max_tokens=5, num_frames=3).with_defaults(s).model_dump(include={"max_tokens", "num_frames"}) \
        == {"max_tokens": 5, "num_frames": 3}
    from service.media.limits import MediaLimits

    assert MediaLimits().max_frames == Settings().max_frames  # the decoder's default cap is the deployment's
