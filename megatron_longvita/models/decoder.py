"""Qwen2.5-style decoder as a megatron-core GPTModel."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from megatron_longvita.config.parallel import ParallelConfig
from megatron_longvita.models.heads import HeadConfig, HeadedGPTModel
from megatron_longvita.models.specs import common_transformer_settings, decoder_block_spec
from megatron_longvita.platform import Platform, current_platform


@dataclass(frozen=True)
class DecoderConfig:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int  # tokenizer vocabulary; padded for TP by `padded_vocab_size`
    max_position_embeddings: int = 32768
    rotary_base: float = 1_000_000.0
    norm_epsilon: float = 1e-6
    qkv_bias: bool = True
    tie_embeddings: bool = False
    make_vocab_size_divisible_by: int = 128

    def padded_vocab_size(self, tensor_model_parallel_size: int) -> int:
        """Pad to a multiple of `make_vocab_size_divisible_by` that TP also divides.

        Unlike Megatron-LM's divisible_by x TP rule, the padded size does not change with TP
        (for any TP dividing the multiple), so checkpoints reshard across TP sizes.
        """
        multiple = math.lcm(self.make_vocab_size_divisible_by, tensor_model_parallel_size)
        return -(-self.vocab_size // multiple) * multiple

    def transformer_config(
        self,
        parallel: ParallelConfig,
        params_dtype: torch.dtype = torch.float32,
        recompute_num_layers: int = 0,
        platform: Optional[Platform] = None,
        **overrides,
    ) -> TransformerConfig:
        """``platform``: default the detected one."""
        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.hidden_size // self.num_attention_heads,
            add_bias_linear=False,
            add_qkv_bias=self.qkv_bias,
            gated_linear_unit=True,
            activation_func=F.silu,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_epsilon,
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
            sequence_parallel=parallel.sequence_parallel,
            pipeline_dtype=params_dtype,
            **common_transformer_settings(params_dtype, platform or current_platform(), recompute_num_layers),
            **overrides,
        )


def build_decoder(
    config: DecoderConfig,
    transformer_config: TransformerConfig,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    layer_spec: Optional[str] = None,
    head: Optional[HeadConfig] = None,
    platform: Optional[Platform] = None,
) -> GPTModel:
    """megatron's GPTModel; with ``head``, a HeadedGPTModel whose last stage uses those output heads.

    ``layer_spec``: an LLM layer spec (default: models.specs.select_layer_spec's training
    choice at this CP size); ``platform``: default the detected one.
    """
    model_class = GPTModel if head is None else functools.partial(HeadedGPTModel, head=head)
    block = decoder_block_spec(transformer_config, platform or current_platform(), layer_spec, vp_stage)
    return model_class(
        config=transformer_config,
        transformer_layer_spec=block,
        vocab_size=config.padded_vocab_size(transformer_config.tensor_model_parallel_size),
        max_sequence_length=config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=config.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(config.rotary_base),
        vp_stage=vp_stage,
    )
