"""vLLM multimodal processing for SR-3D: one `image` item = frames + point maps + region masks.

Layout (the model core's, `model.prompt`): the prompt the engine sends is `layout_query(...)[1].input_ids`,
i.e. one `<image>` per image tile / video frame (the visual prefix, first) and one `<region>` per
`<regionK>` reference in the question. The processor tiles the item with `model.tiling` and expands the prompt with
`model.prompt.expand_prompt`, so both engines feed the LLM the same token layout.

One item has ONE PlaceholderRange from its first image slot to its last region slot; `is_embed` selects
the image and region slots and leaves the newline/question tokens in between as text. The item's embedding
is `cat(tile tokens [T*121], region vectors in slot order)` (precedent: Qwen2.5-Omni `use_audio_in_video`).
The slot order depends on the question (`Is <region1> left of <region0>?`), so the item carries
`region_order`; the item's hash / uuid covers it, which keeps the processor, encoder and prefix caches
correct for different questions on the same media.

The heavy, request-specific work runs BEFORE vLLM, in the caller's own CPU pool (`prepare_item`: tiling,
point-map patch pooling, mask coverage; the VLLMEngine runs it in a thread pool, so requests prepare in
parallel), because vLLM's renderer is one thread whenever the processor cache is on. The processor only wraps
the prepared arrays. The item is compact and carries exactly what the model consumes:
- tiles: uint8 [T, S, S, 3]; the model normalises them on the GPU (`model.tiling.normalize_pixels`), so a
  32-frame item is 19 MB instead of 39 MB of bf16 (77 MB of float32),
- point maps -> per-patch mean point + validity (`model.pos3d.pool_points_to_patches`), float32,
- region masks -> per-patch coverage per slot (area average = what `model.regions.pool_region` does on the
  stitched full-resolution map when the tile size is a multiple of the patch size), float32.
Every input check (including "mask covers no patch after resizing") happens in `prepare_item`, in the API
process: an exception inside the GPU worker would take the whole engine down.
A request whose item vLLM's processor cache already holds sends `header_item` (counts only, no arrays).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BatchFeature

from vllm.config.multimodal import BaseDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import (
    ModalityDataItems,
    MultiModalDataItems,
    MultiModalDataParser,
    ProcessorBatchItems,
)
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)
from vllm.multimodal.processing.processor import PlaceholderFeaturesInfo

from model.config import SR3DConfig
from model.errors import ModelInputError
from model.inputs import RegionMask, SpatialQuery
from model.pos3d import pool_points_to_patches
from model.prompt import PromptLayout, build_prompt, expand_prompt, prompt_token_count, special_token_id
from model.regions import pool_region
from model.tiling import frame_grid, tile_query, tiles_for_grid

# A question may reference a region more than once ("is <region0> bigger than <region1>; where is <region0>?");
# each reference is one slot. Slots are capped so get_mm_max_tokens_per_item has a finite worst case.
SLOTS_PER_REGION = 2

SR3DItem = dict[str, Any]


# ------------------------------------------------------------------------------------------- items
class ItemNotPrepared(ValueError):
    """A header-only item reached the processor: vLLM's processor cache evicted it after the caller's check.
    The caller retries with `prepare_item`."""


def max_region_slots(config: SR3DConfig) -> int:
    return SLOTS_PER_REGION * config.max_regions


def _check_order(query: SpatialQuery, order: list[int], config: SR3DConfig) -> None:
    num_regions = len(query.regions)
    if any(not 0 <= k < num_regions for k in order):
        raise ModelInputError("region_out_of_range", f"region order {order} with {num_regions} region(s)")
    if sorted(set(order)) != list(range(num_regions)):
        raise ModelInputError("unreferenced_region", f"every region must have a slot; order is {order}")
    if len(order) > max_region_slots(config):
        raise ModelInputError("too_many_regions", f"{len(order)} region references > limit {max_region_slots(config)}")


def header_item(query: SpatialQuery, region_order: Sequence[int], config: SR3DConfig) -> SR3DItem:
    """What the processor needs for the prompt layout only (cheap): for an item vLLM's cache already holds.
    The query was validated by `model.prompt.layout_query` (the engine's one check; not repeated here)."""
    order = [int(k) for k in region_order]
    _check_order(query, order, config)
    n, h, w = query.frames.shape[:3]
    grid = frame_grid(w, h, bool(query.is_video), config)
    return {"num_tiles": n * tiles_for_grid(grid), "grid": [grid[0], grid[1], int(grid[2])], "region_order": order}


def prepare_item(query: SpatialQuery, region_order: Sequence[int], config: SR3DConfig) -> SR3DItem:
    """The `multi_modal_data["image"]` entry for one query: validated, tiled and reduced to what the model
    consumes (see the module doc). CPU only, thread-safe. Plain ndarrays/ints/lists, so vLLM's hasher (which
    walks dicts, lists and ndarrays) hashes it without pickling when there is no uuid."""
    _config_checks(config)
    item = header_item(query, region_order, config)
    order = item["region_order"]
    tiled = tile_query(query, config)
    t, patch = tiled.num_tiles, config.patch_size
    side = config.tile_size // patch
    if tiled.points is not None:
        patch_points, patch_valid = pool_points_to_patches(tiled.points, tiled.point_valid, patch)
    else:  # 2D path: no valid point -> the model skips the 3D-PE for this item, exactly like the core
        patch_points, patch_valid = torch.zeros(t, side * side, 3), torch.zeros(t, side * side, dtype=torch.bool)
    coverage = [F.avg_pool2d(_f32(m)[:, None], patch)[:, 0] for m in tiled.region_tiles]  # [T, side, side]
    probe = torch.zeros(t, side * side, 1)
    for cov in coverage:  # the core's own check, run where a failure is a clean client error
        pool_region(probe, cov, tiled.grids)
    region_cov = torch.cat([coverage[k] for k in order]) if order else torch.zeros(0, side, side)
    return {
        **item,
        "tiles": tiled.tiles.numpy(),
        "patch_points": _f32(patch_points).numpy(),
        "patch_valid": patch_valid.contiguous().numpy(),
        "region_cov": _f32(region_cov).numpy(),  # [slots * T, side, side], slot-major
    }


class SR3DImageItems(ProcessorBatchItems[SR3DItem | None]):
    """`image` items that are SR-3D dicts; `get_processor_data` hands the dicts to `_call_hf_processor`."""

    def __init__(self, data: Sequence[SR3DItem | None]) -> None:
        super().__init__(data, "image")

    def tile_count(self, index: int, config: SR3DConfig) -> int:
        item = self.get(index)
        if item is None:
            raise ValueError("SR-3D needs the item's data (a cached item cannot be referenced by uuid alone)")
        return int(item["num_tiles"])

    def region_order(self, index: int) -> list[int]:
        item = self.get(index)
        if item is None:
            raise ValueError("SR-3D needs the item's data (a cached item cannot be referenced by uuid alone)")
        return [int(k) for k in item["region_order"]]


class SR3DDataParser(MultiModalDataParser):
    def _parse_image_data(self, data: Any) -> ModalityDataItems[Any, Any] | None:
        if data is None:
            return None
        items = [data] if isinstance(data, Mapping) else data
        if not isinstance(items, (list, tuple)) or not all(
            i is None or (isinstance(i, Mapping) and "num_tiles" in i and "region_order" in i) for i in items
        ):
            raise ValueError("SR-3D takes multi_modal_data={'image': prepare_item(query, region_order, config)}")
        return SR3DImageItems(list(items))


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous()


def _config_checks(config: SR3DConfig) -> None:
    if config.tile_size % config.patch_size:
        # Per-tile coverage equals the core's stitched-map area average only on patch-aligned tiles.
        raise ValueError(f"tile_size {config.tile_size} must be a multiple of patch_size {config.patch_size}")


# ------------------------------------------------------------------------------------------ info
class SR3DProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> SR3DConfig:
        return self.ctx.get_hf_config(SR3DConfig)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": 1}  # one query = one item (a video is one item of many frames)

    def get_data_parser(self) -> MultiModalDataParser:
        return SR3DDataParser(expected_hidden_size=self._get_expected_hidden_size())

    # ---- token ids and budgets
    def token_ids(self) -> tuple[int, int, list[int]]:
        tok = self.get_tokenizer()
        cfg = self.get_hf_config()
        newline = list(tok("\n", add_special_tokens=False)["input_ids"])
        return special_token_id(tok, cfg.image_token), special_token_id(tok, cfg.region_token), newline

    def max_region_slots(self) -> int:
        return max_region_slots(self.get_hf_config())

    def dummy_region_order(self) -> list[int]:
        # One region referenced max_region_slots times: the worst case in embeddings, with one mask's memory.
        return [0] * self.max_region_slots()

    def _layout(self, num_tiles: int, region_order: list[int]) -> PromptLayout:
        question = " ".join(f"<region{k}>" for k in region_order) or "?"
        regions = max(region_order) + 1 if region_order else 0
        # The image layout (a literal newline per tile) is the costlier one: budgets from it are upper bounds.
        return build_prompt(question, num_tiles, False, regions, self.get_tokenizer(), self.get_hf_config())

    def max_tiles_per_item(self, seq_len: int) -> int:
        """Most tiles one item can have: a `max_frames` video or a `max_tiles` image + thumbnail, capped so the
        worst-case prompt still fits `seq_len`."""
        cfg = self.get_hf_config()
        worst = max(cfg.max_frames, cfg.max_tiles + (1 if cfg.max_tiles > 1 else 0))
        one, two = (prompt_token_count(self._layout(t, self.dummy_region_order())) for t in (1, 2))
        per_tile, overhead = two - one, one - (two - one)
        fits = max(1, (seq_len - overhead) // per_tile)
        return min(worst, fits)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        cfg = self.get_hf_config()
        return {"image": self.max_tiles_per_item(seq_len) * cfg.tokens_per_tile + self.max_region_slots()}

    # ---- one item: wrap the prepared arrays (zero-copy); no pixel is touched in the renderer thread
    def process_item(self, item: SR3DItem) -> dict[str, torch.Tensor]:
        if "tiles" not in item:
            raise ItemNotPrepared("a header-only SR-3D item missed vLLM's processor cache; send prepare_item(...)")
        return {
            "tiles": torch.from_numpy(item["tiles"]),
            "patch_points": torch.from_numpy(item["patch_points"]),
            "patch_valid": torch.from_numpy(item["patch_valid"]),
            "region_cov": torch.from_numpy(item["region_cov"]),
            "num_tiles": torch.tensor(int(item["num_tiles"])),
            "num_slots": torch.tensor(len(item["region_order"])),
            "grid": torch.tensor([int(g) for g in item["grid"]]),
        }


# ----------------------------------------------------------------------------------------- dummy
class SR3DDummyInputsBuilder(BaseDummyInputsBuilder[SR3DProcessingInfo]):
    """The worst case of `get_mm_max_tokens_per_item`: most tiles, most region slots, a point map."""

    def _num_tiles(self, seq_len: int | None) -> int:
        return self.info.max_tiles_per_item(seq_len or self.info.ctx.model_config.max_model_len)

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        if not mm_counts.get("image", 0):
            return ""
        layout = self.info._layout(self._num_tiles(None), self.info.dummy_region_order())
        return self.info.get_tokenizer().decode(layout.input_ids)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Mapping[str, BaseDummyOptions]
    ) -> MultiModalDataDict:
        if not mm_counts.get("image", 0):
            return {}
        cfg = self.info.get_hf_config()
        s, tiles = cfg.tile_size, self._num_tiles(seq_len)
        image_tiles = cfg.max_tiles + (1 if cfg.max_tiles > 1 else 0)
        if tiles >= image_tiles and tiles > cfg.max_frames:
            raise AssertionError("unreachable: max_tiles_per_item never exceeds both shapes")
        if tiles == image_tiles and image_tiles > 1:
            frames = np.full((1, s, cfg.max_tiles * s, 3), 127, np.uint8)  # a max_tiles x 1 grid + thumbnail
            is_video = False
        else:
            frames = np.full((tiles, s, s, 3), 127, np.uint8)
            is_video = True
        f, h, w = frames.shape[:3]
        mask = np.ones((h, w), bool)
        query = SpatialQuery(
            frames=frames,
            question="",
            regions=[[RegionMask(0, mask)]],
            pointmaps=np.zeros((f, h, w, 3), np.float32),
            is_video=is_video,
        )
        return {"image": [prepare_item(query, self.info.dummy_region_order(), cfg)]}


# ------------------------------------------------------------------------------------- processor
class SR3DMultiModalProcessor(BaseMultiModalProcessor[SR3DProcessingInfo]):
    def _call_hf_processor(
        self,
        prompt: str,
        mm_data: Mapping[str, object],
        mm_kwargs: Mapping[str, object],
        tok_kwargs: Mapping[str, object],
    ) -> BatchFeature:
        # Not through ctx.call_hf_processor: that casts every float tensor to the model dtype, and the
        # geometry (patch points, coverage) must stay float32 like in the core.
        ids = self.info.get_tokenizer()(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        out: dict[str, Any] = {"input_ids": [list(ids)]}
        items = list(mm_data.get("images", []))  # type: ignore[arg-type]
        if items:
            per_item = [self.info.process_item(item) for item in items]
            for key in per_item[0]:
                parts = [p[key] for p in per_item]
                out[key] = torch.stack(parts) if parts[0].ndim <= 1 else torch.cat(parts)
        return BatchFeature(out)

    def _hf_processor_applies_updates(self, *args: Any, **kwargs: Any) -> bool:
        return False  # `_call_hf_processor` only tokenizes; the layout is applied below, in token space

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        num_tiles = hf_inputs.get("num_tiles", torch.empty(0, dtype=torch.long))
        num_slots = hf_inputs.get("num_slots", torch.empty(0, dtype=torch.long))
        per_tile = MultiModalFieldConfig.flat_from_sizes("image", num_tiles)
        return {
            "tiles": per_tile,
            "patch_points": per_tile,
            "patch_valid": per_tile,
            "region_cov": MultiModalFieldConfig.flat_from_sizes("image", num_slots * num_tiles),
            "num_tiles": MultiModalFieldConfig.batched("image"),
            "num_slots": MultiModalFieldConfig.batched("image"),
            "grid": MultiModalFieldConfig.batched("image"),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        # Describes one tile's expansion. The item's whole layout (T tiles + its region slots further on in
        # the question) needs the whole prompt, so `_maybe_apply_prompt_updates` applies it.
        image_id, _, newline = self.info.token_ids()
        tile = [image_id] * self.info.get_hf_config().tokens_per_tile + newline
        return [
            PromptReplacement(
                modality="image",
                target=[image_id],
                replacement=PromptUpdateDetails.select_token_id(tile, image_id),
            )
        ]

    def _maybe_apply_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        prompt_ids: list[int],
        mm_kwargs: Any,
        mm_prompt_updates: Any,
        is_update_applied: bool,
    ) -> tuple[list[int], Mapping[str, list[PlaceholderFeaturesInfo]]]:
        # Per-item facts come from mm_items: with the IPC cache, cached items arrive as None in mm_kwargs.
        count = mm_items.get_count("image", strict=False)
        if count == 0:
            return prompt_ids, {}
        items = mm_items.get_items("image", SR3DImageItems)
        cfg = self.info.get_hf_config()
        image_id, region_id, newline = self.info.token_ids()
        num_tiles = items.tile_count(0, cfg)
        order = items.region_order(0)
        if prompt_ids.count(image_id) != num_tiles or prompt_ids.count(region_id) != len(order):
            raise ValueError(
                f"the prompt has {prompt_ids.count(image_id)} <image> and {prompt_ids.count(region_id)} <region> "
                f"tokens; the item needs {num_tiles} and {len(order)}: build it with model.prompt.build_prompt"
            )
        layout = PromptLayout(
            input_ids=list(prompt_ids),
            image_token_id=image_id,
            region_token_id=region_id,
            newline_ids=newline,
            tokens_per_tile=cfg.tokens_per_tile,
            num_tiles=num_tiles,
            region_order=order,
        )
        ids, _ = expand_prompt(layout)
        slots = torch.tensor(ids)
        slots = (slots == image_id) | (slots == region_id)
        where = slots.nonzero().flatten()
        start, end = int(where[0]), int(where[-1]) + 1
        info = PlaceholderFeaturesInfo(
            modality="image", item_idx=0, start_idx=start, tokens=ids[start:end], is_embed=slots[start:end]
        )
        return ids, {"image": [info]}
