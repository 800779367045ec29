"""Pixel shuffle + MLP projector: vision patch features -> LLM-width tokens."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule


@dataclass(frozen=True)
class ProjectorConfig:
    """LayerNorm(c) -> Linear(c -> ffn_hidden_size) -> GELU -> Linear(ffn_hidden_size -> LLM hidden),
    c = ViT hidden x channel_multiplier. Long-VITA: ffn_hidden_size = the ViT hidden size, no
    biases; transformers' InternVL: ffn_hidden_size = the LLM hidden size, with biases."""

    downsample_ratio: float = 0.5
    bias: bool = True
    ffn_hidden_size: Optional[int] = None  # None: the LLM hidden size
    norm_epsilon: float = 1e-5  # torch LayerNorm default, as both references use

    @property
    def channel_multiplier(self) -> int:
        return int(1 / self.downsample_ratio) ** 2

    def intermediate_size(self, llm_hidden: int) -> int:
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else llm_hidden


def pixel_shuffle(features: torch.Tensor, ratio: float) -> torch.Tensor:
    """[n, rows, cols, c] -> [n, rows*ratio, cols*ratio, c/ratio^2], InternVL's exact ordering.

    The reshape/permute sequence fixes which neighbours land in which channel block; any other
    ordering silently scrambles pretrained projector weights.
    """
    n, rows, cols, channels = features.shape
    if (rows * ratio) % 1 or (cols * ratio) % 1:
        raise ValueError(f"pixel shuffle ratio {ratio} does not divide the {rows}x{cols} patch grid")
    features = features.reshape(n, rows, int(cols * ratio), int(channels / ratio))
    features = features.permute(0, 2, 1, 3).reshape(n, int(cols * ratio), int(rows * ratio), int(channels / ratio**2))
    return features.permute(0, 2, 1, 3)


class Projector(MegatronModule):
    """Pixel shuffle, then LayerNorm -> Linear -> GELU -> Linear (column-, then row-parallel).

    Output [tiles, tokens_per_tile, llm_hidden], full (not sequence-sharded) on every TP rank.
    """

    def __init__(self, projector: ProjectorConfig, vision_hidden: int, config: TransformerConfig) -> None:
        # Its input is whole on every TP rank, so the linears must not gather / scatter the sequence.
        config = replace(config, sequence_parallel=False)
        super().__init__(config)
        self.ratio = projector.downsample_ratio
        width = vision_hidden * projector.channel_multiplier
        intermediate = projector.intermediate_size(config.hidden_size)
        self.layer_norm = torch.nn.LayerNorm(width, eps=projector.norm_epsilon, dtype=config.params_dtype)
        self.linear_fc1 = ColumnParallelLinear(
            width, intermediate, config=config, init_method=config.init_method, bias=projector.bias, gather_output=False
        )
        self.linear_fc2 = RowParallelLinear(
            intermediate,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=projector.bias,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        shuffled = pixel_shuffle(features, self.ratio)
        hidden = self.layer_norm(shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1]))
        hidden, _ = self.linear_fc1(hidden)
        hidden, _ = self.linear_fc2(F.gelu(hidden))
        return hidden
