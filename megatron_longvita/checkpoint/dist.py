"""Model weights through megatron dist_checkpointing (torch_dist): save at one layout, load at any."""

from __future__ import annotations

import os

import torch
from megatron.core import dist_checkpointing
from megatron.core.transformer import MegatronModule


def _unwrap(chunk: torch.nn.Module) -> MegatronModule:
    return getattr(chunk, "module", chunk)  # megatron DDP wraps the model in .module


def _model_keys(chunks: list[torch.nn.Module]) -> list[str]:
    # Megatron-LM's convention: "model" without interleaving, "model0".."modelN" with it.
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def sharded_model_state(chunks: list[torch.nn.Module]) -> dict:
    return {key: _unwrap(chunk).sharded_state_dict() for key, chunk in zip(_model_keys(chunks), chunks)}


def save_model(chunks: list[torch.nn.Module], checkpoint_dir: str) -> None:
    """Collective: every rank of the job calls it with its own chunks."""
    if torch.distributed.get_rank() == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(sharded_model_state(chunks), checkpoint_dir)


def load_model(chunks: list[torch.nn.Module], checkpoint_dir: str) -> None:
    """Collective: loads whatever layout the checkpoint was saved at into these chunks."""
    state = dist_checkpointing.load(sharded_model_state(chunks), checkpoint_dir)
    for key, chunk in zip(_model_keys(chunks), chunks):
        _unwrap(chunk).load_state_dict(state[key])
