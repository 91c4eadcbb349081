"""JobSpec + blobs -> SpatialQuery: the worker's CPU stages before the engine.

Stages (each reported through `on_stage(stage, info)` with its seconds):
  decode     PyAV (killable child process, see service/media/decode_child.py) or Pillow; region masks/boxes
             rasterised on the displayed frame and mapped to the sampled frames.
  pointmaps  the backend chosen by SR3D_POINTMAP_BACKEND (model/geometry/routes.py; auto = RGB-D
             for a scene with poses, pose recovery for a scene with depth only, Depth Anything 3
             multi-view for videos, Depth Anything V2 for images). Model backends run through a
             `PointMapBatcher` each, which merges requests from concurrent jobs into one
             `compute_many` call; results are cached by (content hash, sampled frame indices, frame
             size, backend), so a second question on the same video skips the network.
             With `on_scene`, a compact 3D scene for the page (model/geometry/scene_export.py) is
             handed over before the pointmaps event, which then says `"scene": true`.
  measure    model/measure: each region's 3D points (every frame that carries its mask), box and
             sizes, and every pair's distances and directions, from the same point maps
             (`SpatialQuery.measurements`; the worker puts them in `done` and, by answer mode,
             into the prompt or the answer text).
All blocking work runs in threads; the event loop only awaits.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.inputs import RegionMask, SpatialQuery
from model.measure import Measurements, ScaleHint, measure_scene
from service import metrics
from service.blobs import BlobStore
from service.build_once import build_once
from service.media.decode_child import decode_video
from service.media.images import decode_image, image_size
from service.media.limits import MediaError, MediaLimits
from service.media.masks import mask_from_box, mask_from_png, resize_mask
from service.schemas import BoxRegion, JobSpec, MaskRef
from service.settings import GeometrySettings, StoreSettings, WorkerSettings

log = logging.getLogger(__name__)

from model.geometry import PointMaps, SceneError, cache_key

# Frames are decoded at most this large: video frames become one 448 tile each and depth runs at
# ~518, so decoding 1080p/4K at full size would only cost memory.
VIDEO_MAX_SIDE = 896
# Images: dynamic tiling resizes to at most 12 tiles of 448 px (2.4 MP); an image is decoded at no
# more than twice that (aspect kept), which still leaves the tiler's grid choice (aspect, and area
# above half the grid's) unchanged, while a 40 MP photo no longer reaches depth and point maps at
# full size (+2.3 GB in issue 14).
IMAGE_MAX_PIXELS = 2 * 12 * 448 * 448


def image_max_side(size: tuple[int, int]) -> int:
    """The long side at which an image of `size` (W, H) has IMAGE_MAX_PIXELS pixels."""
    w, h = size
    return max(1, int(math.sqrt(IMAGE_MAX_PIXELS * max(w, h) / min(w, h))))

StageCallback = Callable[[str, dict[str, Any]], Awaitable[None]]
SceneCallback = Callable[[bytes], Awaitable[None]]


def media_limits(settings: StoreSettings) -> MediaLimits:
    return MediaLimits(max_bytes=settings.max_upload_bytes, max_frames=settings.max_frames)


class PointMapBackends:
    """The model backends by route ("multiview", "single"); any other object given to `Pipeline`
    serves every model route (tests, benchmarks)."""

    def __init__(self, backends: dict[str, Any]) -> None:
        self.backends = backends

    def get(self, route: str) -> Any:
        if route not in self.backends:
            raise SceneError("backend_unavailable", f"the {route} point-map backend is not loaded (SR3D_POINTMAP_BACKEND)")
        return self.backends[route]


def make_pointmap_backend(settings: GeometrySettings) -> PointMapBackends:
    """The model backends SR3D_POINTMAP_BACKEND can route to: Depth Anything 3 (SR3D_MULTIVIEW_MODEL) for
    videos and Depth Anything V2 (SR3D_DEPTH_MODEL) for images; unset = tiny random demo models (built once)."""
    routes = {"auto": ("multiview", "single"), "multiview": ("multiview",), "single": ("single",)}.get(settings.pointmap_backend, ())
    backends: dict[str, Any] = {}
    if "single" in routes:
        from model.geometry import DepthAnythingBackend, build_tiny_depth_model

        model_dir = settings.depth_model or str(
            build_once(Path(settings.data_dir) / "tiny-depth", lambda tmp: build_tiny_depth_model(str(tmp)))
        )
        backends["single"] = DepthAnythingBackend(model_dir, device=settings.device, input_size=settings.depth_input_size,
                                                  attention=settings.depth_attention, compile=settings.depth_compile)
    if "multiview" in routes:
        from model.geometry.da3 import build_tiny_da3
        from model.geometry.multiview import MultiViewBackend

        mv_dir = settings.multiview_model or str(
            build_once(Path(settings.data_dir) / "tiny-da3", lambda tmp: build_tiny_da3(tmp))
        )
        backends["multiview"] = MultiViewBackend(mv_dir, device=settings.device, process_res=settings.multiview_process_res,
                                                 compile=settings.depth_compile)
    if settings.metric_model and backends:  # SR3D_METRIC_MODEL: plain videos and images in metres (model/geometry/metric.py)
        from model.geometry.metric import MetricDepthModel, with_metric_scale

        backends = with_metric_scale(backends, MetricDepthModel(settings.metric_model, device=settings.device,
                                                                process_res=settings.multiview_process_res))
    return PointMapBackends(backends)


@dataclass(eq=False)  # hashed by identity (held requests live in a set)
class _DepthRequest:
    frames: np.ndarray
    future: asyncio.Future[Any]


class PointMapBatcher:
    """Merges point-map requests of concurrent jobs into `compute_many` calls, `streams` batches at a time.

    A batch takes whole jobs, up to `max_jobs` of them and `max_frames` frames in all (a single job
    larger than that still runs, alone): 4 video jobs of 32 frames = 128 frames, enough to keep the
    depth network's chunks full while bounding the batch's device memory and the wait of its first job.
    Jobs that arrive while batches run queue up and form the next batch at once. With `streams` > 1
    (SR3D_DEPTH_STREAMS, for a backend that `overlaps`: a GPU one, each thread on its own CUDA stream),
    that many batches run at once: one batch's host steps (frames up, point maps back, the cameras'
    small copies) no longer leave the network idle, which made one thread the pipeline's limit (H200,
    loadtests/RESULTS.md: 4.25 -> 4.79 -> 5.03 requests/s with 1, 2, 4 streams)."""

    def __init__(self, backend: Any, window_s: float = 0.01, max_jobs: int = 8, max_frames: int = 128,
                 streams: int = 1) -> None:
        self.backend = backend
        self.window_s = window_s
        # A backend that runs one network pass per job anyway (Depth Anything 3: a job's frames are one
        # multi-view set) gains nothing from several jobs in one batch; one job per batch lets the
        # `streams` loops share the work evenly instead of one loop holding four jobs in turn.
        self.max_jobs = max_jobs if getattr(backend, "merges_jobs", True) else 1
        self.max_frames = max_frames
        self.streams = streams if getattr(backend, "overlaps", False) else 1
        self._queue: asyncio.Queue[_DepthRequest] = asyncio.Queue()
        self._taken: set[_DepthRequest] = set()  # out of the queue, not answered yet (held over or computing)
        self._tasks: list[asyncio.Task[None]] = []

    async def compute(self, frames: np.ndarray) -> Any:
        if not self._tasks or any(t.done() for t in self._tasks):
            await self._stop_tasks()
            self._tasks = [asyncio.create_task(self._loop(), name=f"sr3d-depth-batcher-{i}") for i in range(self.streams)]
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_DepthRequest(frames, fut))
        return await fut

    async def _stop_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def close(self) -> None:
        """Stop the batching tasks (jobs still waiting or being computed are cancelled)."""
        await self._stop_tasks()
        pending = list(self._taken)
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for r in pending:
            if not r.future.done():
                r.future.cancel()
        self._taken.clear()

    async def _next_batch(self, held: _DepthRequest | None) -> tuple[list[_DepthRequest], _DepthRequest | None]:
        """-> (the batch, the request that did not fit and opens this loop's next batch)."""
        loop = asyncio.get_running_loop()
        first = held or await self._queue.get()
        self._taken.add(first)
        batch, frames, left = [first], len(first.frames), None
        deadline = loop.time() + self.window_s
        while len(batch) < self.max_jobs and frames < self.max_frames:
            if self._queue.empty():
                try:
                    r = await asyncio.wait_for(self._queue.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
            else:
                r = self._queue.get_nowait()
            self._taken.add(r)
            if frames + len(r.frames) > self.max_frames:
                left = r
                break
            batch.append(r)
            frames += len(r.frames)
        self._taken.difference_update(r for r in batch if r.future.cancelled())  # cancelled while queued
        return [r for r in batch if not r.future.cancelled()], left

    async def _loop(self) -> None:
        held: _DepthRequest | None = None
        while True:
            batch, held = await self._next_batch(held)
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self.backend.compute_many, [r.frames for r in batch], [None] * len(batch))
            except Exception as e:  # noqa: BLE001 - each waiting job gets the failure
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)
            else:
                for r, res in zip(batch, results):
                    if not r.future.done():
                        r.future.set_result(res)
            # answered (a stopping loop does not get here: close() cancels what it had taken)
            self._taken.difference_update(batch)


@dataclass
class Decoded:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    indices: tuple[int, ...]  # original frame index of each sampled frame (0 for an image)
    regions: list[list[RegionMask]]
    is_video: bool
    frames_decoded: int  # frames the decoder produced to sample these (keyframe seeking skips the rest)


class Pipeline:
    def __init__(self, settings: WorkerSettings, blobs: BlobStore, backend: Any, cache: Any | None = None) -> None:
        self.settings = settings
        self.blobs = blobs
        self.backends = backend if isinstance(backend, PointMapBackends) or backend is None else None
        self._uniform = None if self.backends is not None or backend is None else backend
        self.limits = media_limits(settings)
        self._batchers: dict[int, PointMapBatcher] = {}  # by id(backend): one batcher per model
        if cache is None:
            from model.geometry import PointMapCache

            cache = PointMapCache(max_bytes=settings.pointmap_cache_mb << 20)
        self.cache = cache

    async def build(
        self, job: JobSpec, on_stage: StageCallback, cancelled: asyncio.Event | None = None,
        on_scene: SceneCallback | None = None,
    ) -> SpatialQuery:
        t0 = time.perf_counter()
        decoded = await self.decode(job)
        await on_stage("decode", {"seconds": round(time.perf_counter() - t0, 4), "frames": int(decoded.frames.shape[0]),
                                  "frames_decoded": decoded.frames_decoded,
                                  "size": [int(decoded.frames.shape[2]), int(decoded.frames.shape[1])]})
        if cancelled is not None and cancelled.is_set():
            return SpatialQuery(frames=decoded.frames, question=job.question, regions=decoded.regions, is_video=decoded.is_video)
        t1 = time.perf_counter()
        pm, info = await self.pointmaps(job, decoded)
        info = {"seconds": round(time.perf_counter() - t1, 4), **info}
        if on_scene is not None and await self._export_scene(job, decoded, pm, on_scene):
            info["scene"] = True  # GET /v1/spatial-qa/{id}/scene has it now
        await on_stage("pointmaps", info)
        measurements = await self.measure(job, pm, decoded, on_stage)
        return SpatialQuery(
            frames=decoded.frames,
            question=job.question,
            regions=decoded.regions,
            pointmaps=pm.points,
            pointmap_valid=pm.valid,
            is_video=decoded.is_video,
            media_key=f"{job.media_hash}:{','.join(map(str, decoded.indices))}",
            measurements=measurements,
        )

    async def measure(self, job: JobSpec, pm: PointMaps, decoded: Decoded, on_stage: StageCallback) -> Measurements:
        """The regions' measurements (model/measure) and the `measure` progress event."""
        hint = job.options.scale_hint
        t0 = time.perf_counter()
        m = await asyncio.to_thread(
            measure_scene, pm, decoded.regions,
            scale_hint=ScaleHint(hint.region, hint.dimension, hint.metres) if hint is not None else None)
        await on_stage("measure", {"seconds": round(time.perf_counter() - t0, 4), "scale": m.scale,
                                   "regions": len(m.regions),
                                   "available": sum(1 for r in m.regions if r.available)})
        return m

    # ---- decode ------------------------------------------------------------------------------
    async def decode(self, job: JobSpec) -> Decoded:
        region_frames = sorted({a.frame for region in job.regions for a in region})
        if job.media_kind == "image":
            data = await self.blobs.get(job.media_blob)
            source_size = await asyncio.to_thread(image_size, data, self.limits)
            frame = await asyncio.to_thread(decode_image, data, self.limits, image_max_side(source_size))
            del data
            bad = [f for f in region_frames if f != 0]
            if bad:
                raise MediaError("frame_out_of_range", f"an image has only frame 0; a region is on frame {bad[0]}")
            frames = frame[None]
            indices: tuple[int, ...] = (0,)
            position = {0: 0}
            frames_decoded = 1
        else:
            num_frames = job.options.with_defaults(self.settings).num_frames
            suffix = Path(job.media_filename).suffix[:8]
            async with self.blobs.open_path(job.media_blob, suffix=suffix) as path:
                video = await asyncio.to_thread(
                    decode_video, path, num_frames, self.limits, region_frames, max_side=VIDEO_MAX_SIDE
                )
            frames = video.frames
            indices = tuple(int(i) for i in video.indices)
            source_size = video.source_size
            position = {f: video.index_of(f) for f in region_frames}
            frames_decoded = video.frames_decoded
        out_size = (frames.shape[2], frames.shape[1])
        regions: list[list[RegionMask]] = []
        # One decode per mask blob however many annotations name it, kept only at frame size (the
        # full-resolution array is dropped as soon as it is resized): memory is one full-size mask
        # at a time plus the small copies, not annotations x full size.
        mask_cache: dict[str, np.ndarray] = {}
        for region in job.regions:
            masks = []
            for ann in region:
                if isinstance(ann, BoxRegion):
                    mask = mask_from_box(ann.box, source_size)
                elif isinstance(ann, MaskRef):
                    if ann.mask_blob not in mask_cache:
                        mask_cache[ann.mask_blob] = await asyncio.to_thread(self._mask, await self.blobs.get(ann.mask_blob), source_size, out_size)
                    masks.append(RegionMask(frame=position[ann.frame], mask=mask_cache[ann.mask_blob]))
                    continue
                else:  # pragma: no cover - schemas only store these two
                    raise MediaError("invalid_argument", f"unknown region annotation {type(ann).__name__}")
                masks.append(RegionMask(frame=position[ann.frame], mask=resize_mask(mask, out_size)))
            regions.append(masks)
        return Decoded(frames=frames, indices=indices, regions=regions, is_video=job.media_kind == "video",
                       frames_decoded=frames_decoded)

    @staticmethod
    def _mask(data: bytes, source_size: tuple[int, int], out_size: tuple[int, int]) -> np.ndarray:
        return resize_mask(mask_from_png(data, source_size), out_size)

    # ---- point maps --------------------------------------------------------------------------
    def _backend(self, route: str) -> Any:
        if self._uniform is not None:
            return self._uniform
        if self.backends is None:
            raise SceneError("backend_unavailable", "this worker has no point-map model")
        return self.backends.get(route)

    def _batcher(self, backend: Any) -> PointMapBatcher:
        if id(backend) not in self._batchers:
            self._batchers[id(backend)] = PointMapBatcher(backend, max_jobs=self.settings.depth_batch_jobs,
                                                          max_frames=self.settings.depth_batch_frames,
                                                          streams=self.settings.depth_streams)
        return self._batchers[id(backend)]

    async def pointmaps(self, job: JobSpec, decoded: Decoded) -> tuple[PointMaps, dict[str, Any]]:
        """-> point maps, event info: source, backend (the route), frames_registered[, frames_unregistered]."""
        from model.geometry import load_scene_npz
        from model.geometry.routes import choose_route, registered_frames

        scene = None
        if job.scene_blob:
            data = await self.blobs.get(job.scene_blob)
            scene = await asyncio.to_thread(load_scene_npz, data)
        route = choose_route(self.settings.pointmap_backend, is_video=decoded.is_video, scene_depth=scene is not None,
                             scene_poses=scene is not None and scene.poses is not None)
        if route in ("rgbd", "pose_recovery"):
            assert scene is not None
            return await self._scene_pointmaps(scene, decoded, route)
        f, h, w, _ = decoded.frames.shape
        info: dict[str, Any] = {"backend": route, "frames_registered": registered_frames(route, f)}
        backend = self._backend(route)
        key = cache_key(job.media_hash, (decoded.indices, (w, h)), getattr(backend, "name", type(backend).__name__))
        hit = self.cache.get(key)
        if hit is not None:
            metrics.POINTMAP_CACHE.labels("hit").inc()
            # The event says it was cached; the point maps stay as computed (what is measured from them,
            # and a grounded prompt, must not depend on whether this job was the first on the video).
            return hit, {"source": f"{hit.source} (cached)", **info, **_scale_info(hit)}
        metrics.POINTMAP_CACHE.labels("miss").inc()
        pm = await self._batcher(backend).compute(decoded.frames)
        self.cache.put(key, pm)
        return pm, {"source": pm.source, **info, **_scale_info(pm)}

    async def _scene_pointmaps(self, scene: Any, decoded: Decoded, route: str) -> tuple[PointMaps, dict[str, Any]]:
        """RGB-D upload: arrays hold one entry per sampled frame, or one per source frame (a video's
        full length) from which the sampled ones are taken. Depth must match the source frame size."""
        from model.geometry.routes import scene_pointmaps

        def compute() -> tuple[Any, dict[str, Any]]:
            n = scene.depth.shape[0]
            if scene.frame_indices is not None:  # depth maps labelled with their video frames
                where = {int(v): k for k, v in enumerate(scene.frame_indices)}
                missing = [i for i in decoded.indices if i not in where]
                if missing:
                    raise SceneError("scene_frame_mismatch", f"the scene has no depth for sampled frames {missing[:8]}")
                sel = np.asarray([where[i] for i in decoded.indices])
            elif n == len(decoded.indices):  # one depth map per sampled frame
                sel = np.arange(n)
            elif decoded.is_video and n > max(decoded.indices):  # one per source frame
                sel = np.asarray(decoded.indices)
            else:
                raise SceneError("scene_frame_mismatch", f"scene has {n} depth frames; the job samples {len(decoded.indices)} "
                                 f"frames (original indices up to {max(decoded.indices)}); add frame_indices")
            intr = scene.intrinsics[sel] if scene.intrinsics.ndim == 3 else scene.intrinsics
            depth = scene.depth[sel]
            poses = None if scene.poses is None else scene.poses[sel]
            # pose recovery matches colour to depth pixel for pixel: frames resized to the depth's size
            images = _resize_nearest(decoded.frames, (depth.shape[2], depth.shape[1])) if route == "pose_recovery" else None
            routed = scene_pointmaps(route, depth, intr, poses, images)
            extra: dict[str, Any] = {"frames_registered": routed.registered}
            if routed.unregistered:
                extra["frames_unregistered"] = routed.unregistered
            return routed.pointmaps, extra

        pm, extra = await asyncio.to_thread(compute)
        f, h, w, _ = decoded.frames.shape
        if pm.points.shape[1:3] != (h, w):  # frames were downscaled at decode: nearest-resize to match
            from model.geometry import scale_intrinsics

            src_h, src_w = pm.points.shape[1:3]
            pm = dataclasses.replace(pm, points=_resize_nearest(pm.points, (w, h)), valid=_resize_nearest(pm.valid, (w, h)),
                                     intrinsics=scale_intrinsics(pm.intrinsics, w / src_w, h / src_h))
        return pm, {"source": pm.source, "backend": route, **extra}

    async def _export_scene(self, job: JobSpec, decoded: Decoded, pm: PointMaps, on_scene: SceneCallback) -> bool:
        """The compact scene for the page's 3D view (model.geometry.scene_export), handed to `on_scene`.
        O(region pixels + point budget), a few ms. A viewer extra: a failure is logged, the job goes on."""
        from model.geometry.scene_export import pack_scene

        masks = [[(m.frame, m.mask) for m in region] for region in decoded.regions]
        try:
            data = await asyncio.to_thread(pack_scene, decoded.frames, pm.points, pm.valid, masks, pm.poses,
                                           pm.intrinsics, decoded.indices, scale=pm.scale, metric=pm.metric)
            await on_scene(data)
        except Exception:  # noqa: BLE001 - see docstring
            log.warning("scene export failed for job %s", job.job_id, exc_info=True)
            return False
        return True


def _scale_info(pm: PointMaps) -> dict[str, Any]:
    """The pointmaps event's `metric_scale` (how a model-derived metric scale was found, and its spread)."""
    return {"metric_scale": pm.scale_info} if pm.scale_info else {}


def _resize_nearest(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = a.shape[1:3]
    out_w, out_h = size
    rows = np.minimum((np.arange(out_h) + 0.5) * h / out_h, h - 1).astype(np.int64)
    cols = np.minimum((np.arange(out_w) + 0.5) * w / out_w, w - 1).astype(np.int64)
    return a[:, rows[:, None], cols[None, :]]
