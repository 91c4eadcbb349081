"""SR-3D configuration on top of the NVILA (`llava_llama`) config.json layout.

NVILA stores its three parts as plain dicts (`llm_cfg`, `vision_tower_cfg`, `mm_projector_cfg`); we keep
that layout so a real NVILA-Lite-8B config.json loads unchanged, and add SR-3D's `pos3d_cfg` and
`region_cfg`. `text_config` / `vision_config` are built from those dicts on demand (vLLM and the
transformers modules want real config objects) and cached outside the serialised fields.
"""
from __future__ import annotations

import math
from typing import Any

from transformers import AutoConfig, PretrainedConfig, Qwen2Config, SiglipVisionConfig

_CACHE_PREFIX = "_sr3d_cache_"

DEFAULT_POS3D_CFG: dict[str, Any] = {
    "enabled": True,
    "num_freqs": 32,  # per axis; sin + cos -> 6 * num_freqs input features  [I] not published
    "temperature": 10000.0,  # Video-3D-LLM PositionEmbeddingSine3D analog  [I]
    "scale": 2 * math.pi,
    "mlp_hidden": 1152,
}
DEFAULT_REGION_CFG: dict[str, Any] = {"enabled": True, "max_regions": 8, "mlp_hidden": None}  # None = LLM hidden


class SR3DConfig(PretrainedConfig):
    model_type = "sr3d"

    llm_cfg: dict | None = None
    vision_tower_cfg: dict | None = None
    mm_projector_cfg: dict | None = None
    pos3d_cfg: dict | None = None
    region_cfg: dict | None = None
    tile_size: int = 448
    max_tiles: int = 12
    num_video_frames: int = 32
    max_frames: int = 64
    mm_vision_select_layer: int = -2
    image_token: str = "<image>"
    region_token: str = "<region>"
    # [I] The paper does not publish the prompt text; these are configuration, not code.
    tile_text: str = "<image>\n"  # per image tile (NVILA's dynamic tiling)
    video_frame_text: str = "<image>"  # per video frame: no literal newline (see model/prompt.py)
    region_text: str = "Region [{k}] <region>"
    # `marks` region mode (model/marks.py): what `<regionK>` becomes when regions are drawn into the frames.
    mark_text: str = "the region marked {k} ({colour} outline)"
    system_prompt: str = "You are a helpful assistant"
    # qwen2 chat template with one user turn and the generation prompt (NVILA's conversation format).
    prompt_template: str = (
        "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.llm_cfg = dict(self.llm_cfg or {})
        self.vision_tower_cfg = dict(self.vision_tower_cfg or {})
        self.mm_projector_cfg = dict(self.mm_projector_cfg or {"mm_projector_type": "mlp_downsample_3x3_fix"})
        self.pos3d_cfg = {**DEFAULT_POS3D_CFG, **(self.pos3d_cfg or {})}
        self.region_cfg = {**DEFAULT_REGION_CFG, **(self.region_cfg or {})}

    def _cached(self, name: str, build):  # type: ignore[no-untyped-def]
        key = _CACHE_PREFIX + name
        if key not in self.__dict__:
            object.__setattr__(self, key, build())
        return self.__dict__[key]

    @property
    def text_config(self) -> Qwen2Config:
        cfg = {k: v for k, v in self.llm_cfg.items() if k not in ("model_type", "architectures", "_name_or_path")}
        return self._cached("text_config", lambda: Qwen2Config(**cfg))

    @property
    def vision_config(self) -> SiglipVisionConfig:
        cfg = {k: v for k, v in self.vision_tower_cfg.items() if k not in ("model_type", "architectures", "_name_or_path")}
        return self._cached("vision_config", lambda: SiglipVisionConfig(**cfg))

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> Qwen2Config:
        return self.text_config

    @property
    def hidden_size(self) -> int:  # type: ignore[override]
        return int(self.text_config.hidden_size)

    @hidden_size.setter
    def hidden_size(self, value: int) -> None:
        # NVILA's config.json repeats the LLM width at top level; llm_cfg is the one source of truth.
        pass

    @property
    def vision_hidden_size(self) -> int:
        return int(self.vision_config.hidden_size)

    @property
    def patch_size(self) -> int:
        return int(self.vision_config.patch_size)

    @property
    def patches_per_side(self) -> int:
        return self.tile_size // self.patch_size

    @property
    def tokens_per_side(self) -> int:
        return math.ceil(self.patches_per_side / 3)  # 3x3 space-to-channel after zero padding

    @property
    def tokens_per_tile(self) -> int:
        return self.tokens_per_side**2

    @property
    def select_layer(self) -> int:
        return int(self.mm_vision_select_layer)

    @property
    def max_regions(self) -> int:
        return int(self.region_cfg["max_regions"])

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for k in [k for k in out if k.startswith(_CACHE_PREFIX)]:
            del out[k]
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        out = super().to_diff_dict()
        for k in [k for k in out if k.startswith(_CACHE_PREFIX)]:
            del out[k]
        return out


class NVILAConfig(SR3DConfig):
    """The same fields under NVILA's own model_type (`LlavaLlamaModel` checkpoints)."""

    model_type = "llava_llama"


def register_configs() -> None:
    """Make AutoConfig resolve both model types. Idempotent; safe in every vLLM process."""
    for cfg in (SR3DConfig, NVILAConfig):
        AutoConfig.register(cfg.model_type, cfg, exist_ok=True)


def config_from_dict(d: dict[str, Any]) -> SR3DConfig:
    d = dict(d)
    cls = NVILAConfig if d.pop("model_type", "sr3d") == "llava_llama" else SR3DConfig
    d.pop("transformers_version", None)
    return cls(**d)
