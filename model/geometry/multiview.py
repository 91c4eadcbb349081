"""Multi-view point maps from the Depth Anything 3 port: every sampled frame of a request goes
through the network together (cross-view attention), which predicts depth, confidence, intrinsics
and camera-to-world poses in one shared frame; the maps are then moved to the canonical frame
(reference = frame 0) and scale-normalised like every other backend.

DA3's any-view models predict depth and camera translation up to one common scale, so the result is
`metric=False`; the frames are, unlike the single-view backend's, registered to each other.
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from model.device import model_dir_or_tiny, resolve_device, thread_stream
from model.geometry.da3 import preprocess as da3_preprocess
from model.geometry.intrinsics import broadcast_intrinsics
from model.geometry.project import backproject, finalize
from model.geometry.types import PointMaps


def network_size(h: int, w: int, process_res: int, patch: int = 14) -> tuple[int, int]:
    """Long side scaled to `process_res`, then each side to the nearest patch multiple, ties up (the
    official pre-processing's "upper_bound_resize"; model/geometry/da3/preprocess.py)."""
    return da3_preprocess.network_size(h, w, process_res, patch)


class MultiViewBackend:
    """`compute_many` runs one network pass per request (a request's frames are one multi-view set;
    frames of different requests must not attend to each other)."""

    name = "depth-anything-3"
    merges_jobs = False  # compute_many runs one pass per job: batching jobs together saves nothing

    def __init__(
        self,
        model_dir: str | None = None,
        device: str = "auto",
        process_res: int = 504,
        dtype: torch.dtype | None = None,
        head_chunk: int = 8,
        compile: bool = False,
    ) -> None:
        from model.geometry.da3 import build_tiny_da3, load_da3

        model_dir, self._tmp = model_dir_or_tiny(model_dir, "sr3d-da3-", build_tiny_da3)
        self.model_dir = model_dir
        self.device = resolve_device(device)
        self.overlaps = self.device.type == "cuda"  # concurrent batches pay off only on a GPU (own streams)
        # The official inference runs the backbone under bf16 autocast on GPUs; heads stay float32.
        self.autocast = dtype if dtype is not None else (torch.bfloat16 if self.device.type == "cuda" else None)
        self.process_res = process_res
        self.head_chunk = head_chunk
        self.net = load_da3(model_dir, self.device)
        # The backbone is the cost (all frames' tokens, cross-view attention already through torch's
        # scaled_dot_product_attention); compiled in place, a new frame count/size recompiles once.
        if compile:  # the network calls `backbone.pretrained` directly, so that is the module to compile
            self.net.backbone.pretrained.compile()

    @torch.inference_mode()
    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [F, H, W, 3] -> normalised [1, F, 3, h, w] on the device. The resizes are the official
        ones (OpenCV INTER_AREA / INTER_CUBIC on uint8, on the CPU), then normalised on the device."""
        u8 = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        u8 = da3_preprocess.resize_frames(u8.astype(np.uint8, copy=False), self.process_res,
                                          self.net.config.backbone.patch_size)
        return da3_preprocess.normalise(u8, self.device)

    @torch.inference_mode()
    def predict(self, frames: np.ndarray) -> dict[str, torch.Tensor]:
        """One request's frames -> depth [F, H, W] (frame size, on the device), intrinsics [F, 3, 3] for
        the frame size and camera-to-world poses [F, 4, 4] (float64, CPU), both as predicted."""
        f, h, w, _ = frames.shape
        out = self.net(self.preprocess(frames), autocast_dtype=self.autocast, head_chunk=self.head_chunk)
        nh, nw = out.depth.shape[-2:]
        depth = F.interpolate(out.depth[0][:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        K = out.intrinsics[0].double().cpu().clone()
        # Network pixels -> frame pixels (centre-of-pixel convention: u' = (u + 0.5) s - 0.5).
        for row, s in ((0, w / nw), (1, h / nh)):
            K[:, row, row] *= s
            K[:, row, 2] = (K[:, row, 2] + 0.5) * s - 0.5
        return {"depth": depth, "intrinsics": K.numpy(), "c2w": out.c2w[0].double().cpu().numpy()}

    def compute(self, frames: np.ndarray, intrinsics: np.ndarray | None = None) -> PointMaps:
        """Given intrinsics (a client's calibration) replace the predicted ones for back-projection."""
        if frames.ndim != 4 or len(frames) == 0:
            raise ValueError(f"frames must be a non-empty uint8 [F, H, W, 3] array, got shape {list(frames.shape)}")
        pred = self.predict(frames)
        K = pred["intrinsics"] if intrinsics is None else broadcast_intrinsics(intrinsics, len(frames))
        depth = pred["depth"]
        valid = torch.isfinite(depth) & (depth > 0)
        points = backproject(torch.where(valid, depth, 0.0), K)
        return finalize(points, valid, K, pred["c2w"], metric=False, source=self.name)

    def compute_many(self, frames: list[np.ndarray], intrinsics: list[np.ndarray | None]) -> list[PointMaps]:
        if len(frames) != len(intrinsics):
            raise ValueError("one intrinsics entry (or None) per request")
        with thread_stream(self.device):  # concurrent batches overlap on the GPU (SR3D_DEPTH_STREAMS)
            return [self.compute(fr, k) for fr, k in zip(frames, intrinsics)]
