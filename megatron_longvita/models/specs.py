"""Every layer spec of the LLM and the vision tower, in one registry, and the one selector.

A spec is named; its builder takes the TransformerConfig and the :class:`Platform` value.
:func:`select_layer_spec` is the only place that decides which spec a model gets, from the
platform, the parallel layout, whether packed documents must stay apart (reset packing)
and the purpose (training, or the inference engine with its KV cache). Builders take an
explicit name where a caller needs one (conversion, tests comparing specs).

The core-attention module is a swappable slot: context parallelism plugs ring attention in
here (its block kernel is the platform's), the engine plugs the cached variant.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from megatron.core.transformer import ModuleSpec, TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_longvita.models.layers import LayerScaleTransformerLayer
from megatron_longvita.models.norms import TorchNorm
from megatron_longvita.parallel.attention import CachedRingAttention, RingDotProductAttention
from megatron_longvita.platform import Platform
from megatron_longvita.registry import Registry

logger = logging.getLogger(__name__)

LLM, VISION = "llm", "vision"  # towers
TRAIN, INFERENCE = "train", "inference"  # purposes


@dataclass(frozen=True)
class LayerSpec:
    tower: str  # LLM or VISION
    build: Callable[[TransformerConfig, Platform], ModuleSpec]  # one layer
    transformer_engine: bool = False  # needs TE (its block's final norm is TENorm)


# name -> LayerSpec; plugins register theirs here too
LAYER_SPECS: Registry[LayerSpec] = Registry("layer spec")


def _layer_spec(name: str, tower: str, *, transformer_engine: bool = False):
    def register(build: Callable[[TransformerConfig, Platform], ModuleSpec]):
        LAYER_SPECS.register(name)(LayerSpec(tower, build, transformer_engine))
        return build

    return register


def get_layer_spec(name: str, tower: str) -> LayerSpec:
    spec = LAYER_SPECS.get(name)
    if spec.tower != tower:
        raise ValueError(
            f"layer spec {name!r} builds {spec.tower} layers, not {tower} layers; "
            f"{tower} specs: {', '.join(n for n in LAYER_SPECS if LAYER_SPECS.get(n).tower == tower)}"
        )
    return spec


@_layer_spec("local", LLM)
def local_decoder_layer_spec(config: TransformerConfig, platform: Platform) -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization=config.normalization)
    spec.submodules.input_layernorm = TorchNorm
    spec.submodules.pre_mlp_layernorm = TorchNorm
    return spec


@_layer_spec("local_ring", LLM)
def local_ring_decoder_layer_spec(config: TransformerConfig, platform: Platform) -> ModuleSpec:
    """The local spec with ring attention as core attention: context parallelism without TE."""
    spec = local_decoder_layer_spec(config, platform)
    spec.submodules.self_attention.submodules.core_attention = functools.partial(
        RingDotProductAttention, kernel=platform.attention_kernel
    )
    return spec


@_layer_spec("local_ring_cached", LLM)
def local_ring_cached_decoder_layer_spec(config: TransformerConfig, platform: Platform) -> ModuleSpec:
    """Ring attention that keeps a KV cache and decodes against it: the inference engine's spec."""
    spec = local_decoder_layer_spec(config, platform)
    spec.submodules.self_attention.submodules.core_attention = functools.partial(
        CachedRingAttention, kernel=platform.attention_kernel
    )
    return spec


@_layer_spec("transformer_engine", LLM, transformer_engine=True)
def te_decoder_layer_spec(config: TransformerConfig, platform: Platform) -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(normalization=config.normalization)


def _vision_mask_type(config: TransformerConfig) -> AttnMaskType:
    # Bidirectional; SP pads the tile sequence, so pads must be masked as keys.
    return AttnMaskType.padding if config.sequence_parallel else AttnMaskType.no_mask


@_layer_spec("vision_local", VISION)
def local_vision_layer_spec(config: TransformerConfig, platform: Platform) -> ModuleSpec:
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

    return ModuleSpec(
        module=LayerScaleTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=TorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": _vision_mask_type(config)},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear, core_attention=DotProductAttention, linear_proj=RowParallelLinear
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=TorchNorm,
            mlp=ModuleSpec(
                module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
            ),
            mlp_bda=get_bias_dropout_add,
            # Checkpoint keys as TE names them, so local and TE checkpoints interchange.
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


@_layer_spec("vision_transformer_engine", VISION, transformer_engine=True)
def te_vision_layer_spec(config: TransformerConfig, platform: Platform) -> ModuleSpec:
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_transformer_engine_spec

    spec = get_vit_layer_with_transformer_engine_spec()
    spec.module = LayerScaleTransformerLayer
    spec.submodules.self_attention.params = {"attn_mask_type": _vision_mask_type(config)}
    return spec


_logged_choices: set[tuple[str, str, str]] = set()


def select_layer_spec(
    tower: str,
    platform: Platform,
    *,
    context_parallel_size: int = 1,
    packed_documents: bool = False,
    purpose: str = TRAIN,
) -> str:
    """The layer spec a model gets; logged once per distinct choice.

    - vision: TE where installed, else local (the tower is never context-split).
    - LLM for the inference engine: cached ring attention (prefill over CP, decoding against
      the sharded KV cache), whatever the platform.
    - LLM for training: TE where installed (its attention does CP and packed documents
      itself); else ring attention when CP > 1 or packed documents must not see each other
      (reset packing, at CP=1 too: the local spec's attention cannot keep them apart); else local.
    """
    if tower not in (LLM, VISION) or purpose not in (TRAIN, INFERENCE):
        raise ValueError(
            f"select_layer_spec: tower must be {LLM!r} or {VISION!r} and purpose {TRAIN!r} or "
            f"{INFERENCE!r}; got {tower!r}, {purpose!r}"
        )
    if tower == VISION:
        name, why = (
            ("vision_transformer_engine", "TE installed") if platform.transformer_engine else ("vision_local", "no TE")
        )
    elif purpose == INFERENCE:
        name, why = "local_ring_cached", "inference engine (KV cache sharded over CP)"
    elif platform.transformer_engine:
        name, why = "transformer_engine", "TE installed"
    elif context_parallel_size > 1 or packed_documents:
        name, why = "local_ring", f"no TE; CP={context_parallel_size}, packed documents kept apart={packed_documents}"
    else:
        name, why = "local", "no TE, no CP, no document masking"
    if (tower, name, purpose) not in _logged_choices:
        _logged_choices.add((tower, name, purpose))
        logger.info("%s layer spec for %s on %s: %s (%s)", tower, purpose, platform.name, name, why)
    return name


def common_transformer_settings(
    params_dtype: torch.dtype, platform: Platform, recompute_num_layers: int = 0
) -> dict[str, Any]:
    """TransformerConfig fields the LLM and the vision tower share: dtype, platform, recompute."""
    recompute = (
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=recompute_num_layers)
        if recompute_num_layers
        else {}
    )
    return dict(
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        # Full-size init on every rank, then split: weights do not depend on TP (parity tests).
        use_cpu_initialization=platform.name == "cpu",
        # Fused CUDA kernels (apex/TE) are not on the local path.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        **recompute,
    )


def decoder_block_spec(
    config: TransformerConfig, platform: Platform, spec_name: Optional[str] = None, vp_stage: Optional[int] = None
) -> TransformerBlockSubmodules:
    """The layers this pipeline (and virtual) stage builds, plus the final norm.

    ``spec_name``: default the training choice of :func:`select_layer_spec` at this CP size.
    """
    name = spec_name or select_layer_spec(LLM, platform, context_parallel_size=config.context_parallel_size)
    spec = get_layer_spec(name, LLM)
    layer = spec.build(config, platform)
    final_norm = _te_norm() if spec.transformer_engine else layer.submodules.input_layernorm
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=final_norm
    )


def vision_block_spec(
    config: TransformerConfig, platform: Platform, layer_scale_init: float, spec_name: Optional[str] = None
) -> TransformerBlockSubmodules:
    """All layers (the tower is never pipeline-split), no final norm (InternViT has none)."""
    name = spec_name or select_layer_spec(VISION, platform)
    layer = get_layer_spec(name, VISION).build(config, platform)
    layer = replace(layer, params={**layer.params, "layer_scale_init": layer_scale_init})
    return TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers, layer_norm=None)


def _te_norm():
    from megatron.core.extensions.transformer_engine import TENorm

    return TENorm
