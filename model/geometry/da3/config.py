"""Depth Anything 3 architecture settings, read from a checkpoint directory's config.json.

The official checkpoints (config.json + model.safetensors) name only a preset (`"model_name":
"da3-base"`); the architecture behind each preset is the official YAML's, restated here as numbers.
A config.json may instead spell the architecture out in the same sections as the official YAML
(`net`, `head`, `cam_enc`, `cam_dec`) plus the ViT sizes the preset name would have implied: that is
how the tiny random test/demo model and the benchmark's random-weight models are described.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# ViT sizes behind the official backbone names (DINOv2 ViT-S/B/L/g, patch 14, 518 px pos-embed grid).
_VIT = {
    "vits": dict(embed_dim=384, depth=12, num_heads=6, ffn="mlp"),
    "vitb": dict(embed_dim=768, depth=12, num_heads=12, ffn="mlp"),
    "vitl": dict(embed_dim=1024, depth=24, num_heads=16, ffn="mlp"),
    "vitg": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}


@dataclass(frozen=True)
class BackboneConfig:
    embed_dim: int
    depth: int
    num_heads: int
    out_layers: tuple[int, ...]
    alt_start: int = -1  # first block of the per-view / cross-view alternation (-1: never)
    qknorm_start: int = -1  # blocks from here normalise q and k per head
    rope_start: int = -1  # blocks from here rotate q and k by 2-D patch position
    cat_token: bool = True  # features = [last per-view output, current output] side by side
    mlp_ratio: float = 4.0
    ffn: str = "mlp"  # "mlp" (GELU) or "swiglu" (giant)
    patch_size: int = 14
    img_size: int = 518  # the learnt position embedding covers img_size/patch_size squared patches
    rope_freq: float = 100.0


@dataclass(frozen=True)
class HeadConfig:
    dim_in: int
    features: int
    out_channels: tuple[int, int, int, int]
    output_dim: int = 2  # depth + confidence
    aux_pyramid_levels: int = 4
    aux_out1_conv_num: int = 5


@dataclass(frozen=True)
class CameraConfig:
    enc_dim_out: int
    dec_dim_in: int
    enc_trunk_depth: int = 4
    enc_num_heads: int = 16
    enc_mlp_ratio: float = 4.0


@dataclass(frozen=True)
class DA3Config:
    model_name: str
    backbone: BackboneConfig
    head: HeadConfig
    camera: CameraConfig
    extra: dict[str, Any] = field(default_factory=dict)  # other config.json keys, kept verbatim


# The official presets (configs/da3-{small,base,large,giant}.yaml), as section dicts.
PRESETS: dict[str, dict[str, Any]] = {
    "da3-small": {
        "net": {"name": "vits", "out_layers": [5, 7, 9, 11], "alt_start": 4, "qknorm_start": 4, "rope_start": 4},
        "head": {"dim_in": 768, "features": 64, "out_channels": [48, 96, 192, 384]},
        "cam_enc": {"dim_out": 384}, "cam_dec": {"dim_in": 768},
    },
    "da3-base": {
        "net": {"name": "vitb", "out_layers": [5, 7, 9, 11], "alt_start": 4, "qknorm_start": 4, "rope_start": 4},
        "head": {"dim_in": 1536, "features": 128, "out_channels": [96, 192, 384, 768]},
        "cam_enc": {"dim_out": 768}, "cam_dec": {"dim_in": 1536},
    },
    "da3-large": {
        "net": {"name": "vitl", "out_layers": [11, 15, 19, 23], "alt_start": 8, "qknorm_start": 8, "rope_start": 8},
        "head": {"dim_in": 2048, "features": 256, "out_channels": [256, 512, 1024, 1024]},
        "cam_enc": {"dim_out": 1024}, "cam_dec": {"dim_in": 2048},
    },
    "da3-giant": {
        "net": {"name": "vitg", "out_layers": [19, 27, 33, 39], "alt_start": 13, "qknorm_start": 13, "rope_start": 13},
        "head": {"dim_in": 3072, "features": 256, "out_channels": [256, 512, 1024, 1024]},
        "cam_enc": {"dim_out": 1536}, "cam_dec": {"dim_in": 3072},
    },
}
# Hub ids are upper-case (depth-anything/DA3-BASE); model_name in config.json is lower-case.
_ALIASES = {"da3-base-1.1": "da3-base", "da3-small-1.1": "da3-small"}


def from_sections(model_name: str, sections: dict[str, Any], extra: dict[str, Any] | None = None) -> DA3Config:
    """Official-YAML-shaped sections -> DA3Config (unknown ViT name = sizes must be given)."""
    net = dict(sections["net"])
    vit = dict(_VIT.get(net.pop("name", ""), {}))
    vit.update({k: net.pop(k) for k in list(net) if k in BackboneConfig.__dataclass_fields__})
    unknown = set(net) - {"name"}
    if unknown:
        raise ValueError(f"unknown net settings {sorted(unknown)}")
    vit["out_layers"] = tuple(vit["out_layers"])
    head = dict(sections["head"])
    head.pop("activation", None), head.pop("conf_activation", None)
    head["out_channels"] = tuple(head["out_channels"])
    enc, dec = sections["cam_enc"], sections["cam_dec"]
    camera = CameraConfig(
        enc_dim_out=enc["dim_out"], dec_dim_in=dec["dim_in"], enc_trunk_depth=enc.get("trunk_depth", 4),
        enc_num_heads=enc.get("num_heads", 16), enc_mlp_ratio=enc.get("mlp_ratio", 4.0),
    )
    return DA3Config(model_name, BackboneConfig(**vit), HeadConfig(**head), camera, dict(extra or {}))


def load_config(directory: str | Path) -> DA3Config:
    raw = json.loads((Path(directory) / "config.json").read_text())
    name = str(raw.get("model_name", "")).lower()
    name = _ALIASES.get(name, name)
    if "net" in raw:
        return from_sections(name, raw, {k: v for k, v in raw.items() if k not in ("net", "head", "cam_enc", "cam_dec")})
    if name not in PRESETS:
        raise ValueError(
            f"config.json model_name {raw.get('model_name')!r} is not a multi-view DA3 preset "
            f"({', '.join(PRESETS)}); a metric checkpoint (da3metric-large) goes to SR3D_METRIC_MODEL "
            "(model/geometry/da3/metric_net.py); monocular/nested DA3 checkpoints are not supported"
        )
    return from_sections(name, PRESETS[name], {k: v for k, v in raw.items() if k != "model_name"})


def to_json(config: DA3Config) -> dict[str, Any]:
    """config.json content that `load_config` reads back to the same DA3Config."""
    b, h, c = asdict(config.backbone), asdict(config.head), config.camera
    return {
        "model_name": config.model_name,
        "net": {"name": "custom", **{k: list(v) if isinstance(v, tuple) else v for k, v in b.items()}},
        "head": {k: list(v) if isinstance(v, tuple) else v for k, v in h.items()},
        "cam_enc": {"dim_out": c.enc_dim_out, "trunk_depth": c.enc_trunk_depth, "num_heads": c.enc_num_heads,
                    "mlp_ratio": c.enc_mlp_ratio},
        "cam_dec": {"dim_in": c.dec_dim_in},
        **config.extra,
    }
