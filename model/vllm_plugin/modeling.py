"""SR-3D as a vLLM 0.24 model: vLLM's SigLIP (penultimate layer) + the core's 3D-PE, projector and region
extractor + vLLM's Qwen2, loaded from the flat layout (`model.checkpoint.convert_to_flat`).

The submodule names are the flat layout's key prefixes (`vision_tower.`, `mm_projector.`, `pos3d.`,
`region_extractor.`, `llm.`); the WeightsMapper only re-inserts SigLIP's `vision_model.` level.
`embed_multimodal` mirrors `model.modeling.SR3DForConditionalGeneration.embed_batch` step for step, with the
geometry pre-reduced and the tiles kept uint8 by `processing.prepare_item`.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.siglip import SiglipVisionModel
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from model.config import SR3DConfig
from model.pos3d import PositionEncoding3D
from model.projector import MultimodalProjector
from model.regions import RegionExtractor
from model.tiling import normalize_pixels
from model.vllm_plugin.processing import SR3DDummyInputsBuilder, SR3DMultiModalProcessor, SR3DProcessingInfo


@MULTIMODAL_REGISTRY.register_processor(
    SR3DMultiModalProcessor, info=SR3DProcessingInfo, dummy_inputs=SR3DDummyInputsBuilder
)
class SR3DForConditionalGeneration(nn.Module, SupportsMultiModal):
    # transformers 5 saves SiglipVisionModel without its `vision_model.` level (NVILA's v4-era shards have
    # it); vLLM's SiglipVisionModel wants it. Accept both.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            f"vision_tower.{part}.": f"vision_tower.vision_model.{part}."
            for part in ("embeddings", "encoder", "post_layernorm", "head")
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError("SR-3D takes only the `image` modality (a video is one image item of many frames)")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: SR3DConfig = vllm_config.model_config.hf_config
        self.config = config
        vision_config = config.vision_config
        layers = vision_config.num_hidden_layers + config.select_layer + 1  # -2 -> all but the last layer
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = SiglipVisionModel(
                vision_config,
                quant_config=vllm_config.quant_config,
                num_hidden_layers_override=layers,
                require_post_norm=False,
                prefix=maybe_prefix(prefix, "vision_tower"),
                use_head=False,
            )
            self.mm_projector = MultimodalProjector(config)
            self.pos3d = PositionEncoding3D(config.vision_hidden_size, config.pos3d_cfg)
            self.region_extractor = RegionExtractor(config.vision_hidden_size, config.hidden_size, config.region_cfg)
        with self._mark_language_model(vllm_config):
            self.llm = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "llm"),
                architectures=["Qwen2ForCausalLM"],
            )
        self.make_empty_intermediate_tensors = self.llm.make_empty_intermediate_tensors
        # `<region>` (and on some checkpoints the media tokens) lie past the embedding table: VILA resizes it to
        # its own tokens and SR-3D's placeholder comes after. vLLM then masks placeholder positions to id 0
        # before the text-embedding lookup (as gemma3 does) instead of relying on a padded table.
        ids = getattr(config, "sr3d_token_ids", None)
        vocab = int(config.text_config.vocab_size)
        self.configure_mm_token_handling(vocab, list(ids.values()) if ids else [vocab])

    # ------------------------------------------------------------------ multimodal
    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        tiles = kwargs.get("tiles")
        if tiles is None:
            return []
        num_tiles = [int(n) for n in torch.as_tensor(kwargs["num_tiles"]).flatten().tolist()]
        num_slots = [int(n) for n in torch.as_tensor(kwargs["num_slots"]).flatten().tolist()]
        grids = torch.as_tensor(kwargs["grid"]).reshape(-1, 3).tolist()
        points = kwargs["patch_points"]
        valid = kwargs["patch_valid"]
        region_cov = kwargs["region_cov"]
        assert isinstance(tiles, torch.Tensor) and isinstance(points, torch.Tensor)
        assert isinstance(valid, torch.Tensor) and isinstance(region_cov, torch.Tensor)

        dtype = self.vision_tower.dtype
        # uint8 tiles crossed the process boundary; normalise here, on the GPU, exactly like the core
        feats = self.vision_tower(normalize_pixels(tiles).to(dtype))  # [sum T, N, C], hidden_states[select_layer]
        if self.config.pos3d_cfg.get("enabled", True):
            feats = feats.clone()
            for f, p, ok in zip(feats.split(num_tiles), points.split(num_tiles), valid.split(num_tiles)):
                if bool(ok.any()):  # no valid point = the core's 2D path (it skips the 3D-PE too)
                    f += self.pos3d(p.float(), ok).to(f.dtype)
        tile_tokens = self.mm_projector(feats)  # [sum T, 121, H]

        out: list[torch.Tensor] = []
        covs = region_cov.split([s * t for s, t in zip(num_slots, num_tiles)])
        for f, tt, cov, t, slots, (cols, rows, thumb) in zip(
            feats.split(num_tiles), tile_tokens.split(num_tiles), covs, num_tiles, num_slots, grids
        ):
            frames = t // (cols * rows + int(thumb))
            layout = [(int(cols), int(rows), bool(thumb))] * frames
            # Coverage is at patch resolution already, so the core's area average is the identity here.
            per_slot = list(cov.float().reshape(slots, t, *cov.shape[1:])) if slots else []
            regions = self.region_extractor(f, per_slot, layout)  # [slots, H], in slot order
            out.append(torch.cat([tt.reshape(-1, tt.shape[-1]), regions.to(tt.dtype)]))
        return out

    # ------------------------------------------------------------------ language model
    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.llm.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.llm.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # The SigLIP loader skips the unused last layer, post-layernorm and pooling head; Qwen2 a tied lm_head.
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
