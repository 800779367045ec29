"""Transformer layer variants the layer specs build."""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_longvita.patches.contracts import LAYER_SCALE_BDA, require


def _layer_scaled(bda_builder: Callable, scale: torch.Tensor) -> Callable:
    """Wrap a bias-dropout-add builder so the branch output (bias included) is scaled first."""

    def build(training: bool, fused: bool) -> Callable:
        bda = bda_builder(training, fused)

        def scaled_bda(x_with_bias, residual, prob):
            out, bias = x_with_bias
            return bda((out * scale, None if bias is None else bias * scale), residual, prob)

        return scaled_bda

    return build


class LayerScaleTransformerLayer(TransformerLayer):
    """A TransformerLayer with per-channel scales ls1 / ls2 on the attention / MLP branches
    (InternViT), through TransformerLayer's bias-dropout-add slots (upstream contract
    "transformer-layer-bias-dropout-add")."""

    def __init__(
        self, config: TransformerConfig, submodules, layer_number: int = 1, layer_scale_init: float = 1.0, **kwargs
    ) -> None:
        require(LAYER_SCALE_BDA.name)
        super().__init__(config, submodules, layer_number, **kwargs)
        self.ls1 = torch.nn.Parameter(torch.full((config.hidden_size,), layer_scale_init, dtype=config.params_dtype))
        self.ls2 = torch.nn.Parameter(torch.full((config.hidden_size,), layer_scale_init, dtype=config.params_dtype))
        for scale in (self.ls1, self.ls2):
            # Applied to sequence-sharded activations under SP: gradients are partial per TP rank.
            scale.sequence_parallel = config.sequence_parallel
        self.self_attn_bda = _layer_scaled(self.self_attn_bda, self.ls1)
        self.mlp_bda = _layer_scaled(self.mlp_bda, self.ls2)
