"""Monocular point maps from Depth Anything V2 (transformers), batched across frames and requests.

Relative models predict affine *disparity*; without a metric reference we assume zero shift, floor
the disparity at q98/100 (so sky / zero output cannot become infinite depth), invert, and mark the
result scale-ambiguous (`metric=False`). Metric variants (config.depth_estimation_type == "metric")
predict metres directly. Each frame is its own camera (poses = identity): a single-view model gives
no camera motion, so frames are not registered to each other.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from model.device import model_dir_or_tiny, resolve_device, thread_stream
from model.geometry.intrinsics import DEFAULT_FOV_X_DEG, broadcast_intrinsics, intrinsics_from_fov
from model.geometry.project import ArrayT, as_tensor, backproject, finalize, like, quantile
from model.geometry.types import PointMaps

_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]


def build_tiny_depth_model(directory: str, seed: int = 0, input_size: int = 518, head_bias: float = 1.0) -> str:
    """Write a ~137k-parameter random Depth Anything (real transformers classes) + its processor
    config to `directory`, loadable with `from_pretrained(directory, local_files_only=True)`.

    A random head ends in ReLU and outputs ~0 everywhere; `head_bias` shifts its last conv so the demo
    gets non-degenerate disparity (0 reproduces the all-zero case)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(seed)
    backbone = Dinov2Config(
        image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, out_indices=[1, 2, 3, 4], reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16, head_hidden_size=8,
    )
    model = DepthAnythingForDepthEstimation(config)
    with torch.no_grad():
        model.head.conv3.bias.fill_(head_bias)
    model.save_pretrained(directory)
    _processor(input_size).save_pretrained(directory)
    return directory


def build_large_shaped_depth_model(directory: str, seed: int = 0) -> str:
    """Random weights in the Depth-Anything-V2-Large shape (ViT-L/14, 335M params) for benchmarks."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(seed)
    backbone = Dinov2Config(
        image_size=518, patch_size=14, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, out_indices=[5, 12, 18, 24], reshape_hidden_states=False,
        layerscale_value=1.0, drop_path_rate=0.0,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=1024, neck_hidden_sizes=[256, 512, 1024, 1024],
        fusion_hidden_size=256, head_hidden_size=32,
    )
    DepthAnythingForDepthEstimation(config).save_pretrained(directory)
    _processor(518).save_pretrained(directory)
    return directory


def _processor(size: int):
    from transformers import DPTImageProcessor

    return DPTImageProcessor(
        size={"height": size, "width": size}, keep_aspect_ratio=True, ensure_multiple_of=14, resample=3,
        do_pad=False, image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD,
    )


def disparity_to_depth(disparity: ArrayT) -> tuple[ArrayT, ArrayT]:
    """Relative disparity [F,H,W] of one request -> (depth, valid), finite everywhere, on the input's
    device (numpy in, numpy out).

    One floor for the whole request keeps frames mutually consistent. An all-zero map (random or
    blank) gives depth 1/eps everywhere and valid all False rather than inf/NaN.
    """
    d = torch.nan_to_num(as_tensor(disparity).to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
    sample = d[:, ::4, ::4].reshape(-1)  # quantile on a subsample: same answer, a fraction of the time
    if sample.numel():  # the floor stays a device tensor: no host round trip
        floor = (quantile(sample, 0.98).to(torch.float64) / 100.0).clamp_min(1e-6).to(torch.float32)
    else:
        floor = torch.tensor(1e-6, dtype=torch.float32, device=d.device)
    valid = d > floor
    depth = torch.reciprocal(torch.maximum(d, floor))
    return like(depth, disparity), like(valid, disparity)


class DepthAnythingBackend:
    """`compute_many` = `forward` (network, per frame size, in chunks of `batch_size`) -> `resize`
    (one interpolate per frame size) -> `pointmaps_from_prediction` (per request); everything up to
    the final float32 maps stays on `device`."""

    name = "depth-anything"

    def __init__(
        self,
        model_dir: str | None = None,
        device: str = "auto",
        batch_size: int = 16,
        fov_x_deg: float = DEFAULT_FOV_X_DEG,
        dtype: torch.dtype | None = None,
        input_size: int | None = None,
        attention: str = "sdpa",
        compile: bool = False,
    ) -> None:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        model_dir, self._tmp = model_dir_or_tiny(model_dir, "sr3d-depth-", build_tiny_depth_model)
        self.model_dir = model_dir
        self.device = resolve_device(device)
        self.overlaps = self.device.type == "cuda"  # concurrent batches pay off only on a GPU (own streams)
        # bf16 on GPU (the encoder is compute-bound); fp32 on CPU where bf16 matmuls are slow.
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.batch_size = batch_size
        self.fov_x_deg = fov_x_deg
        # The torchvision-backed processor resizes and normalises on the input tensor's device
        # (`device=` below), so frames cross to the GPU once, as uint8.
        self.processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        # None = the checkpoint's processor size (518 for Depth Anything V2); a smaller target trades
        # depth detail for GPU time (tokens grow with its square).
        self._size = None if input_size is None else {"height": input_size, "width": input_size}
        self.model = AutoModelForDepthEstimation.from_pretrained(
            model_dir, local_files_only=True, dtype=self.dtype
        ).to(self.device).eval()
        # Only the DINOv2 backbone has attention (the DPT head is convolutions). transformers refuses an
        # attn_implementation for the DepthAnything wrapper itself, but the backbone's attention modules
        # read their (shared) config at every call, so setting it there selects the kernel: "sdpa" = fused
        # scaled_dot_product_attention, "eager" = explicit softmax(QK^T)V (the reference maths).
        if attention not in ("sdpa", "eager"):
            raise ValueError(f"attention must be 'sdpa' or 'eager', got {attention!r}")
        self.model.backbone.config._attn_implementation = attention
        self.attention = attention
        # In place (nn.Module.compile): parameters and state-dict keys stay as they are.
        if compile:
            self.model.compile()
        self.metric = getattr(self.model.config, "depth_estimation_type", "relative") == "metric"

    @torch.inference_mode()
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> the processor's pixel values (bicubic resize, ImageNet normalisation)
        in the model dtype, computed on `device`."""
        kwargs = {} if self._size is None else {"size": self._size}
        pixel_values = self.processor(images=x, return_tensors="pt", device=self.device, **kwargs)["pixel_values"]
        return pixel_values.to(self.device, self.dtype)

    @torch.inference_mode()
    def network(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixel values [N, 3, h, w] -> raw model output [N, h, w] float32."""
        return self.model(pixel_values=pixel_values).predicted_depth.float()

    @torch.inference_mode()
    def forward(self, frames: np.ndarray | torch.Tensor | list[np.ndarray]) -> torch.Tensor:
        """uint8 [N, H, W, 3] frames of one size (an array, or a list of arrays that are concatenated
        on the device, not on the host) -> raw model output [N, h', w'] float32 on `device` (at the
        network's resolution), in chunks of `batch_size`."""
        parts = frames if isinstance(frames, list) else [frames]
        x = torch.cat([as_tensor(p).to(self.device) for p in parts]).permute(0, 3, 1, 2)  # uint8 to the device
        outs = [self.network(self.preprocess(x[s : s + self.batch_size])) for s in range(0, len(x), self.batch_size)]
        return torch.cat(outs)

    @torch.inference_mode()
    def resize(self, raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Raw output [N, h', w'] -> [N, H, W] at the frames' size, one batched interpolate."""
        return torch.nn.functional.interpolate(raw[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    @torch.inference_mode()
    def predict_tensors(self, frames: list[np.ndarray]) -> list[torch.Tensor]:
        """Model output (disparity, or metres for metric models) [F, H, W] per request, on `device`.

        Requests of the same frame size share batches: each request has one size, so a size group
        is a run of whole requests and splitting the result gives each its own frames back."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for r, fr in enumerate(frames):
            groups[tuple(fr.shape[1:3])].append(r)
        out: list[torch.Tensor] = [torch.empty(0)] * len(frames)
        for size, members in groups.items():
            lengths = [len(frames[r]) for r in members]
            if sum(lengths) == 0:
                pred = torch.zeros((0, *size), device=self.device)
            else:
                pred = self.resize(self.forward([frames[r] for r in members]), size)
            for r, part in zip(members, pred.split(lengths)):
                out[r] = part
        return out

    def predict(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """`predict_tensors` as numpy arrays (float32 [F, H, W] per request)."""
        return [p.cpu().numpy() for p in self.predict_tensors(frames)]

    @torch.inference_mode()
    def pointmaps_from_prediction(self, pred: torch.Tensor, intrinsics: np.ndarray | None = None) -> PointMaps:
        """One request's model output [F, H, W] (on any device) -> PointMaps, computed on that device."""
        f, h, w = pred.shape
        K = broadcast_intrinsics(intrinsics_from_fov(w, h, self.fov_x_deg) if intrinsics is None else intrinsics, f)
        if self.metric:
            valid = torch.isfinite(pred) & (pred > 0)
            depth = torch.where(valid, pred, 0.0)
        else:
            depth, valid = disparity_to_depth(pred)
        points = backproject(depth, K)
        poses = np.broadcast_to(np.eye(4), (f, 4, 4))
        return finalize(points, valid, K, poses, metric=self.metric, source=self.name)

    def compute(self, frames: np.ndarray, intrinsics: np.ndarray | None = None) -> PointMaps:
        return self.compute_many([frames], [intrinsics])[0]

    def compute_many(self, frames: list[np.ndarray], intrinsics: list[np.ndarray | None]) -> list[PointMaps]:
        if len(frames) != len(intrinsics):
            raise ValueError("one intrinsics entry (or None) per request")
        with thread_stream(self.device):  # concurrent batches overlap on the GPU (SR3D_DEPTH_STREAMS)
            preds = self.predict_tensors(frames)
            return [self.pointmaps_from_prediction(p, K) for p, K in zip(preds, intrinsics)]
