"""Zigzag context-parallel layout: the sequence is cut into 2*CP chunks and rank r holds
chunks r and 2*CP-1-r, so every rank does the same causal attention work.

This is megatron's convention too (``get_batch_on_this_cp_rank`` and the RoPE slicing in
``get_pos_emb_on_this_cp_rank``), so a batch split here meets megatron's rotary
embeddings without translation. Document boundaries (``cu_seqlens``) stay global: every
rank keeps the full list and ring attention derives each rank's documents from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

# micro-batch keys cut along the sequence (dim 1); see the micro-batch contract.
SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class ContextParallelLayoutError(ValueError):
    """A sequence or batch that cannot be laid out over the context-parallel ranks."""


def _check_divisible(length: int, cp_size: int) -> None:
    if length % (2 * cp_size):
        raise ContextParallelLayoutError(
            f"sequence length {length} is not divisible by 2 x context-parallel size = {2 * cp_size}; "
            f"pad it first (pad_for_context_parallel) or choose a seq_length that is a multiple of {2 * cp_size}"
        )


def zigzag_chunks(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two chunk indices (of 2*cp_size) that rank ``cp_rank`` holds."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def zigzag_positions(total_length: int, cp_size: int, cp_rank: int, device: Optional[torch.device] = None) -> Tensor:
    """Global positions of the tokens rank ``cp_rank`` holds, in its local order."""
    _check_divisible(total_length, cp_size)
    chunk = total_length // (2 * cp_size)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in zigzag_chunks(cp_size, cp_rank)])


def zigzag_split(tensor: Tensor, dim: int, cp_size: int, cp_rank: int) -> Tensor:
    """This rank's zigzag share of ``tensor`` along ``dim`` (length divisible by 2*cp_size)."""
    _check_divisible(tensor.shape[dim], cp_size)
    chunks = tensor.chunk(2 * cp_size, dim=dim)
    first, second = zigzag_chunks(cp_size, cp_rank)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


def zigzag_gather(local: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    """Inverse of :func:`zigzag_split` over the CP group: the full sequence on every rank.

    Not differentiable; for outputs (logits, hidden states at inference, tests).
    """
    cp_size = dist.get_world_size(group)
    shares = [torch.empty_like(local) for _ in range(cp_size)]
    dist.all_gather(shares, local.contiguous(), group=group)
    chunks: list[Optional[Tensor]] = [None] * (2 * cp_size)
    for rank, share in enumerate(shares):
        first, second = zigzag_chunks(cp_size, rank)
        chunks[first], chunks[second] = share.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


def pad_for_context_parallel(
    batch: Mapping[str, Optional[Tensor]], cp_size: int, pad_token_id: int = 0
) -> dict[str, Optional[Tensor]]:
    """Pad the sequence keys of a [b, s] micro-batch to a multiple of 2*cp_size.

    Padding carries no loss (loss_mask 0); position ids continue past the last token. With
    reset packing (``cu_seqlens`` given) the padding becomes its own trailing document, so
    no real token attends to it or it to them.
    """
    length = batch["tokens"].shape[1]
    pad = -length % (2 * cp_size)
    if pad == 0:
        return dict(batch)
    padded = dict(batch)
    fills = {"tokens": pad_token_id, "labels": pad_token_id, "loss_mask": 0}
    for key in SEQUENCE_KEYS:
        value = batch.get(key)
        if value is None:
            continue
        if key == "position_ids":
            tail = value[:, -1:] + torch.arange(1, pad + 1, device=value.device)
        else:
            tail = value.new_full((value.shape[0], pad), fills[key])
        padded[key] = torch.cat([value, tail], dim=1)
    cu_seqlens = batch.get("cu_seqlens")
    if cu_seqlens is not None:
        padded["cu_seqlens"] = torch.cat([cu_seqlens, cu_seqlens.new_tensor([length + pad])])
    return padded


def split_batch_for_context_parallel(
    batch: Mapping[str, Optional[Tensor]], cp_size: int, cp_rank: int, pad_token_id: int = 0
) -> dict[str, Optional[Tensor]]:
    """Pad, then keep this rank's zigzag share of tokens, labels, loss_mask, position_ids.

    Labels are already shifted per sample (docs/design.md, "Packing"), so cutting them with
    the tokens loses no target at chunk borders. ``cu_seqlens`` (global, padded) is kept whole.
    """
    padded = pad_for_context_parallel(batch, cp_size, pad_token_id)
    return {
        key: zigzag_split(value, 1, cp_size, cp_rank) if key in SEQUENCE_KEYS and value is not None else value
        for key, value in padded.items()
    }
