"""Layer specs per platform: Transformer Engine on CUDA when installed, local otherwise.

The core-attention module is a swappable slot: context parallelism plugs ring attention
in here, NPU plugs its fused kernel.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from megatron.core.transformer import ModuleSpec, TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_longvita.models.norms import TorchNorm
from megatron_longvita.platform import setup_platform
from megatron_longvita.registry import Registry

# name -> function(config) -> ModuleSpec of one decoder layer
DECODER_LAYER_SPECS: Registry = Registry("decoder layer spec")


@DECODER_LAYER_SPECS.register("local")
def local_decoder_layer_spec(config: TransformerConfig) -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization=config.normalization)
    spec.submodules.input_layernorm = TorchNorm
    spec.submodules.pre_mlp_layernorm = TorchNorm
    return spec


@DECODER_LAYER_SPECS.register("local_ring")
def local_ring_decoder_layer_spec(config: TransformerConfig) -> ModuleSpec:
    """The local spec with ring attention as core attention: context parallelism without TE."""
    from megatron_longvita.parallel.attention import RingDotProductAttention

    spec = local_decoder_layer_spec(config)
    spec.submodules.self_attention.submodules.core_attention = RingDotProductAttention
    return spec


@DECODER_LAYER_SPECS.register("transformer_engine")
def te_decoder_layer_spec(config: TransformerConfig) -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(normalization=config.normalization)


def common_transformer_settings(params_dtype: torch.dtype, recompute_num_layers: int = 0) -> dict[str, Any]:
    """TransformerConfig fields the LLM and the vision tower share: dtype, platform, recompute."""
    recompute = (
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=recompute_num_layers)
        if recompute_num_layers else {}
    )
    return dict(
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        # Full-size init on every rank, then split: weights do not depend on TP (parity tests).
        use_cpu_initialization=setup_platform().name == "cpu",
        # Fused CUDA kernels (apex/TE) are not on the local path.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        **recompute,
    )


def default_layer_spec_name(config: TransformerConfig) -> str:
    """TE where installed (its attention does CP itself); else ours, with ring attention under CP."""
    if setup_platform().transformer_engine:
        return "transformer_engine"
    return "local_ring" if config.context_parallel_size > 1 else "local"


def decoder_block_spec(config: TransformerConfig, spec_name: Optional[str] = None,
                       vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """The layers this pipeline (and virtual) stage builds, plus the final norm."""
    name = spec_name or default_layer_spec_name(config)
    layer = DECODER_LAYER_SPECS.get(name)(config)
    final_norm = _te_norm() if name == "transformer_engine" else layer.submodules.input_layernorm
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=final_norm
    )


def _te_norm():
    from megatron.core.extensions.transformer_engine import TENorm

    return TENorm
