"""The DA3 network (backbone + dual DPT head + camera encoder/decoder) and its checkpoint I/O.

Checkpoint layout = the official one: `config.json` + `model.safetensors` whose keys are
`model.backbone.pretrained.*`, `model.head.*`, `model.cam_enc.*`, `model.cam_dec.*`.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from model.geometry.da3.backbone import VisionTransformer
from model.geometry.da3.camera import CameraDec, CameraEnc, decode_pose
from model.geometry.da3.config import DA3Config, from_sections, load_config, to_json
from model.geometry.da3.head import DualDPT

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
_PREFIX = "model."
# Keys of parts this port does not run or hold (3D-Gaussian head of the giant model).
_IGNORED_PREFIXES = ("gs_head.", "gs_adapter.")


@dataclass
class DA3Output:
    depth: torch.Tensor  # [B, S, h, w] float32, model units (shared by all views)
    conf: torch.Tensor  # [B, S, h, w] float32, > 1
    c2w: torch.Tensor  # [B, S, 4, 4] float32, camera-to-world in the reference view's frame
    intrinsics: torch.Tensor  # [B, S, 3, 3] float32, pixels of the h x w network input


class _Backbone(nn.Module):
    # One level of nesting so parameter names match the checkpoint (backbone.pretrained.*).
    def __init__(self, config: DA3Config) -> None:
        super().__init__()
        self.pretrained = VisionTransformer(config.backbone)


class DA3Net(nn.Module):
    def __init__(self, config: DA3Config) -> None:
        super().__init__()
        self.config = config
        self.backbone = _Backbone(config)
        self.head = DualDPT(config.head, config.backbone.patch_size)
        self.cam_enc = CameraEnc(config.camera)
        self.cam_dec = CameraDec(config.camera.dec_dim_in)

    @torch.inference_mode()
    def forward(
        self,
        images: torch.Tensor,
        c2w: torch.Tensor | None = None,
        intrinsics: torch.Tensor | None = None,
        autocast_dtype: torch.dtype | None = None,
        head_chunk: int = 8,
    ) -> DA3Output:
        """images [B, S, 3, H, W], ImageNet-normalised, H and W multiples of the patch size. Given
        cameras (c2w + intrinsics) condition the backbone; otherwise they are predicted. The backbone
        may run under autocast (`autocast_dtype`); heads and camera maths run in float32."""
        b, s, _, h, w = images.shape
        token = None
        if c2w is not None and intrinsics is not None:
            token = self.cam_enc(c2w.float(), intrinsics.float(), h, w)
        ctx = (
            torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
        )
        with ctx:
            layers = self.backbone.pretrained(images, cam_token=token)
        feats = [f.float() for f, _ in layers]
        depth, conf = self.head(feats, h, w, chunk=head_chunk)
        pose_c2w, K = decode_pose(self.cam_dec(layers[-1][1].float()), h, w)
        return DA3Output(depth=depth, conf=conf, c2w=pose_c2w, intrinsics=K)


def load_da3(directory: str | Path, device: torch.device | str = "cpu") -> DA3Net:
    """An official-layout checkpoint directory -> DA3Net (eval mode, float32 weights) on `device`."""
    from safetensors.torch import load_file

    config = load_config(directory)
    with torch.device("meta"):
        net = DA3Net(config)
    state = load_file(str(Path(directory) / WEIGHTS), device=str(device))
    state = {k[len(_PREFIX):]: v.float() for k, v in state.items() if k.startswith(_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
    missing, unexpected = net.load_state_dict(state, strict=False, assign=True)
    if missing:
        raise ValueError(f"checkpoint does not match {config.model_name}: missing {missing[:5]} ({len(missing)} keys)")
    if unexpected:  # the official loader ignores extra keys too (non-strict); say which
        log.warning("DA3 checkpoint %s: %d keys not used by this port, e.g. %s", directory, len(unexpected), unexpected[:5])
    return net.to(device).eval()


def save_da3(net: DA3Net, directory: str | Path, config_json: dict | None = None) -> Path:
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config_json or to_json(net.config), indent=1))
    save_file({_PREFIX + k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(d / WEIGHTS))
    return d


def _randomise_tokens(net: DA3Net, generator: torch.Generator) -> None:
    # The official init leaves cls/pos-embed at zero; random values make a random model exercise them.
    vit = net.backbone.pretrained
    with torch.no_grad():
        for p in (vit.cls_token, vit.pos_embed, getattr(vit, "camera_token", None)):
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


TINY_SECTIONS = {
    "net": {"name": "custom", "embed_dim": 32, "depth": 6, "num_heads": 2, "img_size": 112,
            "out_layers": [2, 3, 4, 5], "alt_start": 2, "qknorm_start": 2, "rope_start": 2, "cat_token": True},
    "head": {"dim_in": 64, "output_dim": 2, "features": 16, "out_channels": [8, 16, 32, 32]},
    "cam_enc": {"dim_out": 32, "num_heads": 2, "trunk_depth": 2},
    "cam_dec": {"dim_in": 64},
}


def build_tiny_da3(directory: str | Path, seed: int = 0) -> str:
    """A ~160k-parameter random DA3 (6 blocks, alternation and RoPE from block 2) in the official
    layout, for tests and the demo."""
    torch.manual_seed(seed)
    config = from_sections("da3-tiny", TINY_SECTIONS)
    net = DA3Net(config)
    _randomise_tokens(net, torch.Generator().manual_seed(seed))
    with torch.no_grad():  # fields of view near 1 rad: a random decoder's ReLU would often give 0 (focal -> inf)
        fov = net.cam_dec.fc_fov[0]
        fov.weight.mul_(0.1)
        fov.bias.fill_(1.0)
    save_da3(net, directory)
    return str(directory)


def build_random_da3(directory: str | Path, preset: str = "da3-base", seed: int = 0) -> str:
    """Random weights in an official preset's shape, config.json naming only the preset (as the
    published checkpoints do): benchmarks at real shapes."""
    from model.geometry.da3.config import PRESETS

    torch.manual_seed(seed)
    net = DA3Net(from_sections(preset, PRESETS[preset]))
    _randomise_tokens(net, torch.Generator().manual_seed(seed))
    save_da3(net, directory, {"model_name": preset})
    return str(directory)
