"""Monocular point maps from Depth Anything V2 (transformers), batched across frames and requests.

Relative models predict affine *disparity*; without a metric reference we assume zero shift, floor
the disparity at q98/100 (so sky / zero output cannot become infinite depth), invert, and mark the
result scale-ambiguous (`metric=False`). Metric variants (config.depth_estimation_type == "metric")
predict metres directly. Each frame is its own camera (poses = identity): a single-view model gives
no camera motion, so frames are not registered to each other.
"""
from __future__ import annotations

import tempfile
from collections import defaultdict

import numpy as np
import torch

from model.geometry.intrinsics import DEFAULT_FOV_X_DEG, broadcast_intrinsics, intrinsics_from_fov
from model.geometry.project import backproject, finalize
from model.geometry.types import PointMaps

_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]


def build_tiny_depth_model(directory: str, seed: int = 0, input_size: int = 518, head_bias: float = 1.0) -> str:
    """Write a ~137k-parameter random Depth Anything (real transformers classes) + its processor
    config to `directory`, loadable with `from_pretrained(directory, local_files_only=True)`.

    A random head ends in ReLU and outputs ~0 everywhere; `head_bias` shifts its last conv so the demo
    gets non-degenerate disparity (0 reproduces the all-zero case)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def disparity_to_depth(disparity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relative disparity [F,H,W] of one request -> (depth, valid), finite everywhere.

    One floor for the whole request keeps frames mutually consistent. An all-zero map (random or
    blank) gives depth 1/eps everywhere and valid all False rather than inf/NaN.
    """
    d = np.nan_to_num(disparity.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    sample = d[:, ::4, ::4].ravel()  # quantile on a subsample: same answer, a fraction of the time
    floor = max(float(np.quantile(sample, 0.98)) / 100.0, 1e-6) if sample.size else 1e-6
    valid = d > floor
    depth = 1.0 / np.maximum(d, np.float32(floor))
    return depth.astype(np.float32), valid


class DepthAnythingBackend:
    name = "depth-anything"

    def __init__(
        self,
        model_dir: str | None = None,
        device: str = "auto",
        batch_size: int = 16,
        fov_x_deg: float = DEFAULT_FOV_X_DEG,
        dtype: torch.dtype | None = None,
    ) -> None:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self._tmp = None
        if model_dir is None:  # demo / tests: the tiny random model, built on the fly
            self._tmp = tempfile.TemporaryDirectory(prefix="sr3d-depth-")
            model_dir = build_tiny_depth_model(self._tmp.name)
        self.model_dir = model_dir
        self.device = resolve_device(device)
        # bf16 on GPU (the encoder is compute-bound); fp32 on CPU where bf16 matmuls are slow.
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.batch_size = batch_size
        self.fov_x_deg = fov_x_deg
        self.processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForDepthEstimation.from_pretrained(
            model_dir, local_files_only=True, dtype=self.dtype
        ).to(self.device).eval()
        self.metric = getattr(self.model.config, "depth_estimation_type", "relative") == "metric"

    @torch.inference_mode()
    def predict(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """Raw model output (disparity, or metres for metric models) at each frame's resolution.

        Frames of all requests are grouped by size and run in batches of `batch_size`."""
        flat = [(r, i) for r, fr in enumerate(frames) for i in range(len(fr))]
        groups: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        for r, i in flat:
            groups[frames[r].shape[1:3]].append((r, i))
        out = [np.zeros(fr.shape[:3], dtype=np.float32) for fr in frames]
        for (h, w), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                batch = torch.from_numpy(np.stack([frames[r][i] for r, i in chunk])).to(self.device)
                pixel_values = self.processor(
                    images=batch.permute(0, 3, 1, 2), return_tensors="pt", device=self.device
                )["pixel_values"].to(self.device, self.dtype)
                pred = self.model(pixel_values=pixel_values).predicted_depth  # [B, h', w']
                pred = torch.nn.functional.interpolate(
                    pred[:, None].float(), size=(h, w), mode="bilinear", align_corners=False
                )[:, 0].cpu().numpy()
                for (r, i), p in zip(chunk, pred):
                    out[r][i] = p
        return out

    def compute(self, frames: np.ndarray, intrinsics: np.ndarray | None = None) -> PointMaps:
        return self.compute_many([frames], [intrinsics])[0]

    def compute_many(self, frames: list[np.ndarray], intrinsics: list[np.ndarray | None]) -> list[PointMaps]:
        if len(frames) != len(intrinsics):
            raise ValueError("one intrinsics entry (or None) per request")
        raw = self.predict(frames)
        result = []
        for fr, K, pred in zip(frames, intrinsics, raw):
            f, h, w = fr.shape[:3]
            K = broadcast_intrinsics(intrinsics_from_fov(w, h, self.fov_x_deg) if K is None else K, f)
            if self.metric:
                valid = np.isfinite(pred) & (pred > 0)
                depth = np.where(valid, pred, 0.0).astype(np.float32)
            else:
                depth, valid = disparity_to_depth(pred)
            points = backproject(depth, K)
            poses = np.broadcast_to(np.eye(4), (f, 4, 4)).copy()
            result.append(finalize(points, valid, K, poses, metric=self.metric, source=self.name))
        return result
