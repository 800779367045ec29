"""Torch LayerNorm / RMSNorm for the local (non-TE) layer specs, sequence-parallel aware.

megatron's WrappedTorchNorm refuses sequence parallel. Under SP each TP rank normalises a
different slice of the sequence, so the norm weights' gradients are partial sums: tagging
them ``sequence_parallel`` makes megatron's ``finalize_model_grads`` all-reduce them over
the TP group (untagged, the gradients are silently wrong).
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class TorchNorm:
    """Spec entry building torch's LayerNorm or RMSNorm (megatron's build_module needs a class)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused) -> torch.nn.Module:
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization {config.normalization!r} unsupported; use one of {sorted(norms)}")
        norm = norms[config.normalization](hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
