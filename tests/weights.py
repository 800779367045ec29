"""Comparable copies of a model's tensors, for tests that check weights bit for bit."""

from __future__ import annotations

import torch


def tensor_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict, cloned (megatron also keeps non-tensor extra state there)."""
    return {name: value.clone() for name, value in module.state_dict().items() if isinstance(value, torch.Tensor)}
