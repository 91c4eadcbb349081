"""Depth Anything 3's monocular METRIC model (DA3METRIC-LARGE): one frame at a time -> depth in units
of (focal / 300) metres, plus a sky map. Official checkpoint layout (config.json naming the preset +
model.safetensors with `model.backbone.pretrained.*`, `model.head.*` keys).

How it differs from the any-view network in net.py (official configs/da3metric-large.yaml vs da3-large.yaml):
- backbone: the same ViT-L, but no per-view / cross-view alternation, no QK-norm, no RoPE, no camera
  token, and features are the final-normed tokens only (`cat_token: False`); taken after blocks
  4, 11, 17, 23;
- head: a single DPT (not the dual one): no LayerNorm on the tokens, no UV position embedding, one
  output channel (exp -> depth, no confidence) and a second 1-channel branch after the shared neck,
  the sky map (ReLU);
- no camera encoder / decoder: it predicts no intrinsics, so converting its output to metres needs a
  focal length from elsewhere (`metric_depth`).
After the head, as the official forward does, pixels whose sky value is >= 0.3 get the 99th
percentile of the other pixels' depth (only when both sets have more than 10 pixels; over all frames
of the call together). The official code takes that percentile on a random subsample of 100,000
pixels when there are more; this port takes it exactly (the same value up to sampling noise).
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.geometry.da3.backbone import VisionTransformer
from model.geometry.da3.config import _VIT, BackboneConfig, HeadConfig
from model.geometry.da3.head import _HIDDEN, FusionBlock, _up, dpt_pyramid

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
_PREFIX = "model."
# The metric model's convention (official README "Monocular Metric Depth" and utils/alignment.py
# apply_metric_scaling): metres = output * focal / 300, focal = (fx + fy) / 2 in pixels of the network input.
FOCAL_UNIT = 300.0
SKY_THRESHOLD = 0.3  # official compute_sky_mask: sky where the sky map is >= 0.3
_MIN_PIXELS = 10  # the official sky fill runs only when sky and non-sky each have more pixels than this

# configs/da3metric-large.yaml, restated as numbers.
METRIC_PRESETS: dict[str, dict[str, Any]] = {
    "da3metric-large": {
        "net": {"name": "vitl", "out_layers": [4, 11, 17, 23], "alt_start": -1, "qknorm_start": -1, "rope_start": -1,
                "cat_token": False},
        "head": {"dim_in": 1024, "output_dim": 1, "features": 256, "out_channels": [256, 512, 1024, 1024]},
    },
}


@dataclass(frozen=True)
class DA3MetricConfig:
    model_name: str
    backbone: BackboneConfig
    head: HeadConfig
    extra: dict[str, Any] = field(default_factory=dict)


def metric_config_from_sections(model_name: str, sections: dict[str, Any], extra: dict[str, Any] | None = None) -> DA3MetricConfig:
    net = dict(sections["net"])
    vit = dict(_VIT.get(net.pop("name", ""), {}))
    vit.update({k: net.pop(k) for k in list(net) if k in BackboneConfig.__dataclass_fields__})
    if set(net) - {"name"}:
        raise ValueError(f"unknown net settings {sorted(set(net) - {'name'})}")
    vit["out_layers"] = tuple(vit["out_layers"])
    if vit.get("alt_start", -1) != -1 or vit.get("cat_token", True):
        raise ValueError("a DA3 metric backbone has no cross-view alternation and cat_token False")
    head = dict(sections["head"])
    for k in ("activation", "conf_activation", "use_sky_head", "pos_embed", "norm_type"):
        head.pop(k, None)  # the official defaults are the only ones this port runs (module docstring)
    head["out_channels"] = tuple(head["out_channels"])
    if head.get("output_dim", 1) != 1:
        raise ValueError("a DA3 metric head has one output channel (depth)")
    return DA3MetricConfig(model_name, BackboneConfig(**vit), HeadConfig(**head), dict(extra or {}))


def load_metric_config(directory: str | Path) -> DA3MetricConfig:
    raw = json.loads((Path(directory) / "config.json").read_text())
    name = str(raw.get("model_name", "")).lower()
    if "net" in raw:
        return metric_config_from_sections(name, raw, {k: v for k, v in raw.items() if k not in ("net", "head")})
    if name not in METRIC_PRESETS:
        raise ValueError(f"config.json model_name {raw.get('model_name')!r} is not a DA3 metric preset ({', '.join(METRIC_PRESETS)})")
    return metric_config_from_sections(name, METRIC_PRESETS[name], {k: v for k, v in raw.items() if k != "model_name"})


def metric_config_json(config: DA3MetricConfig) -> dict[str, Any]:
    b, h = asdict(config.backbone), asdict(config.head)
    for k in ("aux_pyramid_levels", "aux_out1_conv_num"):  # dual-head settings, not part of this head
        h.pop(k)
    return {
        "model_name": config.model_name,
        "net": {"name": "custom", **{k: list(v) if isinstance(v, tuple) else v for k, v in b.items()}},
        "head": {k: list(v) if isinstance(v, tuple) else v for k, v in h.items()},
        **config.extra,
    }


class MetricDPT(nn.Module):
    """Four backbone layers -> feature pyramid -> (depth, sky) at the patch grid's pixel size. Parameter
    names follow the official DPT head (projects, resize_layers, scratch.*) so checkpoints load as they are."""

    def __init__(self, cfg: HeadConfig, patch_size: int = 14) -> None:
        super().__init__()
        self.patch_size = patch_size
        f = cfg.features
        self.projects, self.resize_layers, s = dpt_pyramid(cfg)
        for i in range(1, 5):
            setattr(s, f"refinenet{i}", FusionBlock(f, lateral=i != 4))
        s.output_conv1 = nn.Conv2d(f, f // 2, 3, 1, 1)
        s.output_conv2 = nn.Sequential(nn.Conv2d(f // 2, _HIDDEN, 3, 1, 1), nn.ReLU(), nn.Conv2d(_HIDDEN, 1, 1))
        s.sky_output_conv2 = nn.Sequential(nn.Conv2d(f // 2, _HIDDEN, 3, 1, 1), nn.ReLU(), nn.Conv2d(_HIDDEN, 1, 1))
        self.scratch = s

    def forward_frames(self, feats: list[torch.Tensor], h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """feats: 4 x [N, P, C] -> depth [N, h', w'] (exp), sky [N, h', w'] (ReLU)."""
        ph, pw = h // self.patch_size, w // self.patch_size
        pyr = [self.resize_layers[i](self.projects[i](t.transpose(1, 2).reshape(len(t), -1, ph, pw)))
               for i, t in enumerate(feats)]
        s = self.scratch
        l1, l2, l3, l4 = (getattr(s, f"layer{i + 1}_rn")(p) for i, p in enumerate(pyr))
        out = s.refinenet4(l4, size=l3.shape[2:])
        out = s.refinenet3(out, l3, size=l2.shape[2:])
        out = s.refinenet2(out, l2, size=l1.shape[2:])
        out = s.output_conv1(s.refinenet1(out, l1))
        out = _up(out, (ph * self.patch_size, pw * self.patch_size))
        return s.output_conv2(out)[:, 0].exp(), s.sky_output_conv2(out)[:, 0].relu()

    def forward(self, feats: list[torch.Tensor], h: int, w: int, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        b, sv = feats[0].shape[:2]
        flat = [f.flatten(0, 1) for f in feats]
        parts = [self.forward_frames([f[i : i + chunk] for f in flat], h, w) for i in range(0, b * sv, chunk)]
        depth = torch.cat([p[0] for p in parts]).view(b, sv, *parts[0][0].shape[1:])
        sky = torch.cat([p[1] for p in parts]).view(b, sv, *parts[0][1].shape[1:])
        return depth, sky


@dataclass
class DA3MetricOutput:
    depth: torch.Tensor  # [B, S, h, w] float32, raw output (sky filled): metres = depth * focal_px / 300
    sky: torch.Tensor  # [B, S, h, w] float32 sky map (>= 0.3: sky)

    @property
    def non_sky(self) -> torch.Tensor:
        return self.sky < SKY_THRESHOLD


class _Backbone(nn.Module):
    # One level of nesting so parameter names match the checkpoint (backbone.pretrained.*).
    def __init__(self, config: DA3MetricConfig) -> None:
        super().__init__()
        self.pretrained = VisionTransformer(config.backbone)


class DA3MetricNet(nn.Module):
    def __init__(self, config: DA3MetricConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = _Backbone(config)
        self.head = MetricDPT(config.head, config.backbone.patch_size)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, autocast_dtype: torch.dtype | None = None, head_chunk: int = 8) -> DA3MetricOutput:
        """images [B, S, 3, H, W], ImageNet-normalised, H and W multiples of the patch size; each frame
        is seen alone (no attention across frames). The backbone may run under autocast; the head in float32."""
        _, _, _, h, w = images.shape
        ctx = torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
        with ctx:
            layers = self.backbone.pretrained(images)
        depth, sky = self.head([f.float() for f, _ in layers], h, w, chunk=head_chunk)
        return DA3MetricOutput(depth=fill_sky(depth, sky), sky=sky)


def fill_sky(depth: torch.Tensor, sky: torch.Tensor) -> torch.Tensor:
    """Sky pixels -> the 99th percentile (linear) of the other pixels' depth, over the whole tensor."""
    from model.geometry.project import quantile

    non_sky = sky < SKY_THRESHOLD
    n = int(non_sky.sum())
    if n <= _MIN_PIXELS or non_sky.numel() - n <= _MIN_PIXELS:
        return depth
    return torch.where(non_sky, depth, quantile(depth[non_sky], 0.99))


def metric_depth(depth: torch.Tensor, fx: torch.Tensor | float, fy: torch.Tensor | float) -> torch.Tensor:
    """Raw output -> metres; fx, fy in pixels of the image the network saw (per frame: shape [..., 1, 1])."""
    return depth * ((fx + fy) / 2.0 / FOCAL_UNIT)


def load_da3_metric(directory: str | Path, device: torch.device | str = "cpu") -> DA3MetricNet:
    """An official-layout metric checkpoint directory -> DA3MetricNet (eval, float32) on `device`."""
    from safetensors.torch import load_file

    config = load_metric_config(directory)
    with torch.device("meta"):
        net = DA3MetricNet(config)
    state = load_file(str(Path(directory) / WEIGHTS), device=str(device))
    state = {k[len(_PREFIX):]: v.float() for k, v in state.items() if k.startswith(_PREFIX)}
    missing, unexpected = net.load_state_dict(state, strict=False, assign=True)
    if missing:
        raise ValueError(f"checkpoint does not match {config.model_name}: missing {missing[:5]} ({len(missing)} keys)")
    if unexpected:
        log.warning("DA3 metric checkpoint %s: %d keys not used by this port, e.g. %s", directory, len(unexpected), unexpected[:5])
    return net.to(device).eval()


def save_da3_metric(net: DA3MetricNet, directory: str | Path, config_json: dict | None = None) -> Path:
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config_json or metric_config_json(net.config), indent=1))
    save_file({_PREFIX + k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(d / WEIGHTS))
    return d


TINY_METRIC_SECTIONS = {
    "net": {"name": "custom", "embed_dim": 32, "depth": 6, "num_heads": 2, "img_size": 112, "out_layers": [1, 2, 4, 5],
            "alt_start": -1, "qknorm_start": -1, "rope_start": -1, "cat_token": False},
    "head": {"dim_in": 32, "output_dim": 1, "features": 16, "out_channels": [8, 16, 32, 32]},
}


def _randomise(net: DA3MetricNet, seed: int, sky_bias: float, sky_gain: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    vit = net.backbone.pretrained
    with torch.no_grad():
        # The official init leaves cls/pos-embed at zero; random values make a random model exercise them.
        for p in (vit.cls_token, vit.pos_embed):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        # A sky branch that marks some pixels as sky (a random one is ~0 everywhere after its ReLU), so
        # the sky fill is exercised: the tiny model's gain 20 and bias 0.25 mark 1-3 % of random-pixel frames.
        net.head.scratch.sky_output_conv2[2].weight.mul_(sky_gain)
        net.head.scratch.sky_output_conv2[2].bias.fill_(sky_bias)


def build_tiny_da3_metric(directory: str | Path, seed: int = 0, sky_bias: float = 0.25, sky_gain: float = 20.0) -> str:
    """A ~164k-parameter random DA3 metric model in the official layout, for tests (its 'metres' are not metres)."""
    torch.manual_seed(seed)
    net = DA3MetricNet(metric_config_from_sections("da3metric-tiny", TINY_METRIC_SECTIONS))
    _randomise(net, seed, sky_bias, sky_gain)
    save_da3_metric(net, directory)
    return str(directory)


def build_random_da3_metric(directory: str | Path, preset: str = "da3metric-large", seed: int = 0) -> str:
    """Random weights in the official preset's shape, config.json naming only the preset: benchmarks."""
    torch.manual_seed(seed)
    net = DA3MetricNet(metric_config_from_sections(preset, METRIC_PRESETS[preset]))
    _randomise(net, seed, 0.0)
    save_da3_metric(net, directory, {"model_name": preset})
    return str(directory)
