"""SR-3D forward and batched generation on transformers modules (the correctness oracle for the vLLM plugin).

vision_tower (SigLIP, penultimate layer) -> + 3D-PE per patch -> mm_projector (3×3 merge, 121 tokens/tile)
-> spliced into the Qwen2 prompt embeddings at the image slots; region vectors (mask-pooled from the same
SigLIP+3D-PE features, projected) fill the `<region>` slots. `generate` decodes a batch with left padding,
one KV cache, per-row sampling and stop rules, and streams correctly detokenised text deltas.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache, Qwen2ForCausalLM, SiglipVisionModel

from model.config import SR3DConfig
from model.inputs import GenerationParams, SpatialQuery, TokenDelta
from model.pos3d import PositionEncoding3D, pool_points_to_patches
from model.prompt import PromptLayout, expand_prompt, layout_query, stop_token_ids
from model.projector import MultimodalProjector
from model.regions import RegionExtractor
from model.tiling import TiledInputs, normalize_pixels, tile_query

log = logging.getLogger(__name__)

VISION_CHUNK = 32  # tiles per SigLIP forward: bounds activation memory for 13-tile images and 64-frame videos


@dataclass
class PreparedInputs:
    """Everything CPU-side for one request; `embed` turns it into LLM input embeddings."""

    tiled: TiledInputs
    layout: PromptLayout
    input_ids: list[int]  # expanded: image slots and region slots carry their placeholder ids
    image_positions: list[int]

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class StageTimes:
    """Seconds per stage of the last `embed_batch`/`generate` call (device-synchronised), for benchmarks."""

    values: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.values[name] = self.values.get(name, 0.0) + time.perf_counter() - t0


class _Detokenizer:
    """Incremental detokenisation: emit text only once it no longer ends in a partial UTF-8 sequence, and
    decode a short window (prefix/read offsets) so each step costs O(1) tokens, not O(n)."""

    def __init__(self, tokenizer) -> None:  # type: ignore[no-untyped-def]
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (a truncated multi-byte character at the very end)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class SR3DForConditionalGeneration(nn.Module):
    def __init__(self, config: SR3DConfig, tokenizer) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.vision_tower = SiglipVisionModel._from_config(config.vision_config, attn_implementation="sdpa")
        self.mm_projector = MultimodalProjector(config)
        self.pos3d = PositionEncoding3D(config.vision_hidden_size, config.pos3d_cfg)
        self.region_extractor = RegionExtractor(config.vision_hidden_size, config.hidden_size, config.region_cfg)
        self.llm = Qwen2ForCausalLM._from_config(config.text_config, attn_implementation="sdpa")
        self._stop_ids = set(stop_token_ids(tokenizer))
        # `embedding` (SR-3D's region vectors) or `marks` (regions drawn into the frames); set by the loader.
        self.region_mode = "embedding"

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.llm.parameters()).dtype

    # ---------------------------------------------------------------- CPU side
    def prepare(self, query: SpatialQuery) -> PreparedInputs:
        """Validate, tile and lay out the prompt. CPU only, thread-safe (no module state touched)."""
        cfg = self.config
        context = int(cfg.text_config.max_position_embeddings)
        query, layout = layout_query(query, self.tokenizer, cfg, context, region_mode=self.region_mode)
        tiled = tile_query(query, cfg)
        ids, image_pos = expand_prompt(layout)
        return PreparedInputs(tiled=tiled, layout=layout, input_ids=ids, image_positions=image_pos)

    # ---------------------------------------------------------------- device side
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[T, 3, S, S] -> SigLIP hidden_states[select_layer] [T, N, C]."""
        out = []
        for chunk in pixel_values.split(VISION_CHUNK):
            hs = self.vision_tower(pixel_values=chunk, output_hidden_states=True).hidden_states
            out.append(hs[self.config.select_layer])
        return torch.cat(out)

    @torch.inference_mode()
    def embed_batch(self, batch: list[PreparedInputs], times: StageTimes | None = None) -> list[torch.Tensor]:
        """One SigLIP pass over every tile of every request; returns per-request [L, hidden]."""
        times = times or StageTimes()
        dev, dt = self.device, self.dtype
        counts = [p.tiled.num_tiles for p in batch]
        with times.stage("vision", dev):
            # uint8 to the device, normalised there (a quarter of float32's host-to-device bytes)
            pixels = normalize_pixels(torch.cat([p.tiled.tiles for p in batch]).to(dev, non_blocking=True)).to(dt)
            feats = self.vision_features(pixels)
        with times.stage("pos3d", dev):
            if self.config.pos3d_cfg.get("enabled", True):
                feats = feats.clone()
                for i, (p, f) in enumerate(zip(batch, feats.split(counts))):
                    if p.tiled.points is None:
                        continue  # 2D path: exactly NVILA
                    pts, ok = pool_points_to_patches(
                        p.tiled.points.to(dev), p.tiled.point_valid.to(dev), self.config.patch_size
                    )
                    f += self.pos3d(pts, ok).to(f.dtype)
        with times.stage("projector", dev):
            tile_tokens = self.mm_projector(feats)  # [sum T, 121, H]
        out = []
        emb = self.llm.get_input_embeddings()
        for p, f, tt in zip(batch, feats.split(counts), tile_tokens.split(counts)):
            with times.stage("regions", dev):
                regions = self.region_extractor(f, p.tiled.region_tiles, p.tiled.grids)
            with times.stage("splice", dev):
                out.append(self._splice(p, tt, regions, emb))
        return out

    def embed(self, prepared: PreparedInputs, times: StageTimes | None = None) -> torch.Tensor:
        return self.embed_batch([prepared], times)[0]

    def _splice(self, p: PreparedInputs, tile_tokens: torch.Tensor, regions: torch.Tensor, emb: nn.Module) -> torch.Tensor:
        dev = self.device
        ids = torch.tensor(p.input_ids, device=dev)
        lay = p.layout
        slots = (ids == lay.image_token_id) | (ids == lay.region_token_id)
        x = emb(torch.where(slots, torch.zeros_like(ids), ids))  # placeholder ids may lie outside the vocab
        image_pos = torch.tensor(p.image_positions, device=dev, dtype=torch.long)
        x[image_pos] = tile_tokens.reshape(-1, tile_tokens.shape[-1]).to(x.dtype)
        region_pos = (ids == lay.region_token_id).nonzero().flatten()
        if len(lay.region_order):
            x[region_pos] = regions[torch.tensor(lay.region_order, device=dev)].to(x.dtype)
        return x

    # ---------------------------------------------------------------- decoding
    def _sample(self, logits: torch.Tensor, params: list[GenerationParams], gens: list[torch.Generator | None]) -> list[int]:
        logits = logits.float()
        vocab = len(self.tokenizer)
        if logits.shape[-1] > vocab:  # padded embedding rows are not tokens
            logits[:, vocab:] = float("-inf")
        greedy = logits.argmax(-1).tolist()
        out = []
        for i, p in enumerate(params):
            if p.temperature <= 0.0:
                out.append(int(greedy[i]))
                continue
            probs = torch.softmax(logits[i] / p.temperature, -1)
            if p.top_p < 1.0:
                sp, idx = probs.sort(descending=True)
                keep = sp.cumsum(-1) - sp < p.top_p  # always keeps the top token
                probs = torch.zeros_like(probs).scatter_(0, idx[keep], sp[keep])
            out.append(int(torch.multinomial(probs, 1, generator=gens[i]).item()))
        return out

    @torch.inference_mode()
    def generate(
        self,
        batch: list[PreparedInputs],
        params: list[GenerationParams],
        on_delta: Callable[[int, TokenDelta], bool | None] | None = None,
        times: StageTimes | None = None,
    ) -> list[GenerationResult]:
        """Decode all rows together. `on_delta(row, delta)` returning False aborts that row (no further
        deltas for it; its result ends with finish_reason "abort")."""
        if len(batch) != len(params):
            raise ValueError("one GenerationParams per prepared input")
        if not batch:
            return []
        times = times or StageTimes()
        dev = self.device
        embeds = self.embed_batch(batch, times)
        b = len(batch)
        lens = [e.shape[0] for e in embeds]
        width = max(lens)
        hidden = embeds[0].shape[-1]
        x = embeds[0].new_zeros(b, width, hidden)
        mask = torch.zeros(b, width, dtype=torch.long, device=dev)
        for i, e in enumerate(embeds):
            x[i, width - lens[i]:] = e  # left padding: every row's next token sits at the last column
            mask[i, width - lens[i]:] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)

        gens: list[torch.Generator | None] = []
        for p in params:
            if p.temperature > 0.0:
                g = torch.Generator(device=dev)
                g.manual_seed(p.seed if p.seed is not None else random.getrandbits(63))
                gens.append(g)
            else:
                gens.append(None)

        cache = DynamicCache(config=self.llm.config)
        with times.stage("prefill", dev):
            out = self.llm(inputs_embeds=x, attention_mask=mask, position_ids=pos, past_key_values=cache,
                           use_cache=True, logits_to_keep=1)
        detok = [_Detokenizer(self.tokenizer) for _ in batch]
        tokens: list[list[int]] = [[] for _ in batch]
        texts: list[list[str]] = [[] for _ in batch]
        finish: list[str | None] = [None] * b
        next_pos = pos[:, -1:] + 1
        t_decode = time.perf_counter()
        steps = 0
        while True:
            chosen = self._sample(out.logits[:, -1, :], params, gens)
            for i in range(b):
                if finish[i] is not None:
                    continue
                tid = chosen[i]
                p = params[i]
                tokens[i].append(tid)
                stop = tid in self._stop_ids and not p.ignore_eos
                piece = "" if stop else detok[i].push(tid)
                reason = "stop" if stop else ("length" if len(tokens[i]) >= p.max_tokens else None)
                if reason is not None:
                    piece += detok[i].flush()
                texts[i].append(piece)
                if on_delta is not None:
                    keep = on_delta(i, TokenDelta(
                        text=piece, token_ids=[tid], finished=reason is not None, finish_reason=reason,
                        prompt_tokens=lens[i], completion_tokens=len(tokens[i])))
                    if keep is False and reason is None:
                        reason = "abort"
                finish[i] = reason
            if all(f is not None for f in finish):
                break
            steps += 1
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            ids = torch.tensor(chosen, device=dev).unsqueeze(1)
            out = self.llm(input_ids=ids, attention_mask=mask, position_ids=next_pos, past_key_values=cache,
                           use_cache=True, logits_to_keep=1)
            next_pos = next_pos + 1
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.values["decode_total"] = time.perf_counter() - t_decode
        times.values["decode_steps"] = float(steps)
        return [
            GenerationResult(token_ids=tokens[i], text="".join(texts[i]), finish_reason=str(finish[i]),
                             prompt_tokens=lens[i], completion_tokens=len(tokens[i]))
            for i in range(b)
        ]
