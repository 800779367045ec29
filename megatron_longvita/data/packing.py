"""Packing samples into fixed-length rows (docs/design.md, "Packing").

Two registries (declared in ``megatron_longvita.registry``): ``BIN_PACKERS`` decide which
samples share a row, ``PACKING_LAYOUTS`` decide how a row is laid out for attention:

- ``reset``: position ids restart at 0 for every sample; ``cu_seqlens`` marks the sample
  boundaries (THD form, megatron's PackedSeqParams) so attention is block-diagonal causal.
  The padding tail is its own trailing segment, hence ``cu_seqlens[-1] == b * s`` as THD
  kernels expect; it carries no loss.
- ``no_reset``: position ids run 0..s-1 and attention is causal over the whole row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from megatron_longvita.registry import BIN_PACKERS, PACKING_LAYOUTS

from .sample import PreparedSample

BinPacker = Callable[[Sequence[int], int], list[list[int]]]
PackingLayout = Callable[[Sequence[int], int], tuple[np.ndarray, "np.ndarray | None"]]

__all__ = ["BIN_PACKERS", "PACKING_LAYOUTS", "BinPacker", "PackingLayout", "build_micro_batch"]


@BIN_PACKERS.register("greedy")
def pack_in_order(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Next-fit in arrival order: keeps the data order, fills less tightly."""
    bins: list[list[int]] = []
    free = 0
    for index, length in enumerate(lengths):
        if not bins or length > free:
            bins.append([])
            free = capacity
        bins[-1].append(index)
        free -= length
    return bins


@BIN_PACKERS.register("ffd")
def pack_first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Longest first, each into the first row with room; rows list their samples in arrival order."""
    bins: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        target = next((row for row, room in enumerate(free) if room >= lengths[index]), None)
        if target is None:
            bins.append([])
            free.append(capacity)
            target = len(bins) - 1
        bins[target].append(index)
        free[target] -= lengths[index]
    return [sorted(row) for row in bins]


@PACKING_LAYOUTS.register("reset")
def reset_layout(lengths: Sequence[int], seq_length: int) -> tuple[np.ndarray, np.ndarray]:
    padding = seq_length - sum(lengths)
    segments = [*lengths, padding] if padding else list(lengths)
    positions = np.concatenate([np.arange(length) for length in segments]) if segments else np.zeros(0)
    return positions.astype(np.int64), np.cumsum([0, *segments]).astype(np.int32)


@PACKING_LAYOUTS.register("no_reset")
def continuous_layout(lengths: Sequence[int], seq_length: int) -> tuple[np.ndarray, None]:
    return np.arange(seq_length, dtype=np.int64), None


def build_micro_batch(
    rows: Sequence[Sequence[PreparedSample]],
    pixel_values: torch.Tensor,
    seq_length: int,
    layout: PackingLayout,
    pad_id: int,
) -> dict:
    """Stack packed rows into the micro-batch contract (``stats`` is added by the caller).

    With several rows, ``cu_seqlens`` indexes the flattened [b * s] tokens.
    """
    tokens = np.full((len(rows), seq_length), pad_id, dtype=np.int64)
    labels = np.full((len(rows), seq_length), pad_id, dtype=np.int64)
    loss_mask = np.zeros((len(rows), seq_length), dtype=np.float32)
    position_ids = np.empty((len(rows), seq_length), dtype=np.int64)
    boundaries: list[np.ndarray] = []
    for row_index, row in enumerate(rows):
        lengths = [len(sample) for sample in row]
        if sum(lengths) > seq_length:
            raise ValueError(f"row of {sum(lengths)} tokens exceeds seq_length {seq_length}")
        start = 0
        for sample, length in zip(row, lengths):
            tokens[row_index, start : start + length] = sample.tokens
            labels[row_index, start : start + length] = sample.labels
            loss_mask[row_index, start : start + length] = sample.loss_mask
            start += length
        position_ids[row_index], row_boundaries = layout(lengths, seq_length)
        if row_boundaries is not None:
            boundaries.append(row_boundaries[:-1] + row_index * seq_length)
    cu_seqlens = None
    if boundaries:
        cu_seqlens = torch.from_numpy(np.concatenate([*boundaries, [len(rows) * seq_length]]).astype(np.int32))
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
        "cu_seqlens": cu_seqlens,
        "pixel_values": pixel_values,
    }
