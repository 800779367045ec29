"""RoPE scaling at inference, for prompts longer than the trained context (linear, NTK, YaRN).

All three rescale megatron's ``RotaryEmbedding.inv_freq`` (the same table serves prefill,
through GPTModel, and decode, through :func:`rotary_table`). YaRN also scales cos/sin by an
attention factor m; since RoPE multiplies both q and k, that is softmax scale x m^2 in core
attention. Formulas follow transformers' ``modeling_rope_utils`` (linear, yarn) and the
static NTK-aware rule base' = base * factor^(d / (d - 2)).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from torch import Tensor

ROPE_SCALING_KINDS = ("linear", "ntk", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    kind: str  # one of ROPE_SCALING_KINDS
    factor: float
    original_max_position_embeddings: Optional[int] = None  # YaRN; default: the model's max_position_embeddings
    beta_fast: float = 32.0  # YaRN ramp bounds, in rotations over the original context
    beta_slow: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALING_KINDS:
            raise ValueError(f"--rope-scaling must be one of {ROPE_SCALING_KINDS}, got {self.kind!r}")
        if self.factor <= 1.0:
            raise ValueError(f"--rope-scaling-factor must be > 1, got {self.factor}")

    def inv_freq(self, base: float, dim: int, max_position_embeddings: int) -> Tensor:
        exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
        if self.kind == "ntk":
            return 1.0 / (base * self.factor ** (dim / (dim - 2))) ** exponents
        inv_freq = 1.0 / base**exponents
        if self.kind == "linear":
            return inv_freq / self.factor
        original = self.original_max_position_embeddings or max_position_embeddings

        def correction_dim(rotations: float) -> float:
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(self.beta_fast)), 0)
        high = min(math.ceil(correction_dim(self.beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        # high frequencies (ramp 0) keep their value, low ones (ramp 1) are interpolated
        return inv_freq * (1 - ramp) + inv_freq / self.factor * ramp

    @property
    def attention_factor(self) -> float:
        return 0.1 * math.log(self.factor) + 1.0 if self.kind == "yarn" else 1.0


def apply_rope_scaling(
    rotary: RotaryEmbedding,
    attention_modules: Iterable,
    scaling: RopeScaling,
    base: float,
    max_position_embeddings: int,
) -> None:
    """Rescale a freshly built model's RoPE. Call before its first forward: megatron caches
    ``RotaryEmbedding.forward`` results per length."""
    dim = rotary.inv_freq.shape[0] * 2
    rotary.inv_freq = scaling.inv_freq(base, dim, max_position_embeddings).to(rotary.inv_freq.device)
    for module in attention_modules:
        module.softmax_scale *= scaling.attention_factor**2


def rotary_table(rotary: RotaryEmbedding, length: int) -> Tensor:
    """RoPE angles of positions [0, length): [length, d] (megatron's emb without its CP split)."""
    return rotary.get_emb(length)[:, 0, 0]
