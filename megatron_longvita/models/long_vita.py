"""The Long-VITA model: InternViT -> pixel shuffle + MLP projector -> scatter into the text
embeddings -> Qwen2.5 GPTModel.

The vision tower and projector exist only where the chunk pre-processes (pipeline stage 0,
first virtual stage) and run before any context-parallel split, whole on each CP rank.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from megatron_longvita.config.parallel import ParallelConfig
from megatron_longvita.models.decoder import build_decoder
from megatron_longvita.models.heads import HeadConfig
from megatron_longvita.models.presets import ModelConfig
from megatron_longvita.models.projector import Projector
from megatron_longvita.models.specs import LLM, TRAIN, VISION, select_layer_spec
from megatron_longvita.models.vision import InternViT
from megatron_longvita.parallel import zigzag_gather, zigzag_split
from megatron_longvita.platform import Platform, current_platform
from megatron_longvita.registry import Registry

# (pre_process, post_process, vp_stage) -> model chunk; training.loop.build_model_chunks calls it per stage
ModelProvider = Callable[[bool, bool, Optional[int]], MegatronModule]

# name -> function(config, parallel, **options) -> ModelProvider for build_model_chunks
MODEL_PROVIDERS: Registry = Registry("model provider")


def scatter_vision_embeddings(
    embeddings: torch.Tensor,
    features: torch.Tensor,
    placeholders: torch.Tensor,
    sequence_parallel: bool,
    cp_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Replace placeholder positions of the text embeddings by vision tokens, in order.

    embeddings: [s, b, h], or this TP rank's [s/tp, b, h] slice under sequence parallelism.
    features: [n, h], n = number of placeholders in the whole sequence; placeholders: [b, s]
    bool. Order is batch-major over [b, s], as transformers' masked_scatter fills. Under
    context parallelism (``cp_group``) the inputs are this rank's zigzag share: the
    placeholder order is counted on the gathered sequence, then cut back to the share.
    """
    full = placeholders if cp_group is None else zigzag_gather(placeholders.int(), 1, cp_group).bool()
    count = int(full.sum())
    if count != features.shape[0]:
        raise ValueError(
            f"the prompt has {count} vision placeholder tokens but the tiles give {features.shape[0]} "
            f"vision embeddings; expand each tile to exactly tokens_per_tile placeholders"
        )
    if count == 0:
        return embeddings
    index = (full.flatten().cumsum(0) - 1).clamp(min=0).view_as(full)
    if cp_group is not None:
        index = zigzag_split(index, 1, cp_group.size(), cp_group.rank())
    vision = features[index.t()]  # [s, b, h], rows at non-placeholders are ignored
    mask = placeholders.t().unsqueeze(-1)
    if sequence_parallel:
        vision = tensor_parallel.scatter_to_sequence_parallel_region(vision)  # backward all-gathers
        mask = tensor_parallel.scatter_to_sequence_parallel_region(mask)
    return torch.where(mask, vision.to(embeddings.dtype), embeddings)


class LongVitaModel(MegatronModule):
    def __init__(
        self,
        config: ModelConfig,
        language_config: TransformerConfig,
        vision_config: Optional[TransformerConfig],
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
        layer_spec: Optional[str] = None,
        vision_layer_spec: Optional[str] = None,
        head: Optional[HeadConfig] = None,
        platform: Optional[Platform] = None,
    ) -> None:
        super().__init__(language_config)
        platform = platform or current_platform()
        self.model_type = ModelType.encoder_or_decoder  # what megatron's schedules look up
        self.model_config = config
        self.pre_process = pre_process
        self.post_process = post_process
        self.vision: Optional[InternViT] = None
        self.projector: Optional[Projector] = None
        if pre_process:
            self.vision = InternViT(config.vision, vision_config, vision_layer_spec, platform)
            self.projector = Projector(config.projector, config.vision.hidden_size, language_config)
        self.language_model = build_decoder(
            config.decoder, language_config, pre_process, post_process, vp_stage, layer_spec, head, platform
        )
        self.share_embeddings_and_output_weights = config.decoder.tie_embeddings

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self) -> torch.nn.Parameter:
        # finalize_model_grads all-reduces tied embeddings over PP through the chunk with `pre_process`.
        return self.language_model.shared_embedding_or_output_weight()

    def freeze(self, vision: bool = False, projector: bool = False, language_model: bool = False) -> None:
        """Stage recipes: e.g. stage 1 trains only the projector -> freeze(vision=True, language_model=True)."""
        for part, frozen in ((self.vision, vision), (self.projector, projector), (self.language_model, language_model)):
            for param in part.parameters() if part is not None else ():
                param.requires_grad_(not frozen)

    def embed(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, pixel_values: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Text embeddings with the projected tiles scattered into the context placeholders."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)
        placeholders = torch.isin(input_ids, torch.tensor(self.model_config.context_token_ids, device=input_ids.device))
        if pixel_values is None:
            features = embeddings.new_zeros(0, embeddings.shape[-1])
        else:
            features = self.projector(self.vision(pixel_values)).flatten(0, 1)
        cp_group = parallel_state.get_context_parallel_group() if self.config.context_parallel_size > 1 else None
        return scatter_vision_embeddings(embeddings, features, placeholders, self.config.sequence_parallel, cp_group)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        pixel_values: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        """Logits [b, s, vocab/tp] (or per-token loss with labels) on the last stage, hidden states elsewhere."""
        decoder_input = self.embed(input_ids, position_ids, pixel_values) if self.pre_process else None
        return self.language_model(
            input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels, **kwargs
        )


def build_long_vita(
    config: ModelConfig,
    parallel: ParallelConfig,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    *,
    params_dtype: torch.dtype = torch.float32,
    recompute_language_layers: int = 0,
    recompute_vision_layers: int = 0,
    platform: Optional[Platform] = None,
    purpose: str = TRAIN,
    packed_documents: bool = False,
    layer_spec: Optional[str] = None,
    vision_layer_spec: Optional[str] = None,
    head: Optional[HeadConfig] = None,
) -> LongVitaModel:
    """One model chunk. Needs megatron's parallel state (initialize_distributed) already set up.

    ``platform``: default the detected one (its patch set is the entry point's business, as
    megatron's parallel state is). The layer specs are models.specs.select_layer_spec's choice
    for ``purpose`` ("train" / "inference") and ``packed_documents`` (reset packing) unless
    named by ``layer_spec`` / ``vision_layer_spec``.
    """
    platform = platform or current_platform()
    layer_spec = layer_spec or select_layer_spec(
        LLM,
        platform,
        context_parallel_size=parallel.context_parallel_size,
        packed_documents=packed_documents,
        purpose=purpose,
    )
    vision_layer_spec = vision_layer_spec or select_layer_spec(VISION, platform, purpose=purpose)
    language_config = config.decoder.transformer_config(parallel, params_dtype, recompute_language_layers, platform)
    vision_config = (
        config.vision.transformer_config(parallel, params_dtype, recompute_vision_layers, platform)
        if pre_process
        else None
    )
    return LongVitaModel(
        config,
        language_config,
        vision_config,
        pre_process,
        post_process,
        vp_stage,
        layer_spec,
        vision_layer_spec,
        head,
        platform,
    )


@MODEL_PROVIDERS.register("long_vita")
def long_vita_provider(config: ModelConfig, parallel: ParallelConfig, **options) -> ModelProvider:
    """(pre_process, post_process, vp_stage) -> chunk; options as build_long_vita's keywords."""
    return functools.partial(build_long_vita, config, parallel, **options)


def gather_logits(local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Vocab-parallel logits -> full logits over the real (unpadded) vocabulary."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        local_logits = tensor_parallel.gather_from_tensor_model_parallel_region(local_logits)
    return local_logits[..., :vocab_size]
