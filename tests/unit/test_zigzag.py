"""Zigzag layout utilities and the ring plan (single process)."""

from __future__ import annotations

import pytest
import torch

from megatron_longvita.parallel import (
    ContextParallelLayoutError,
    pad_for_context_parallel,
    plan_ring,
    split_batch_for_context_parallel,
    zigzag_positions,
    zigzag_split,
)


def test_zigzag_positions_cp2() -> None:
    assert zigzag_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_positions(8, 2, 1).tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_zigzag_split_is_a_partition_in_global_order(cp_size: int) -> None:
    sequence = torch.arange(3 * 2 * cp_size * 5).view(3, -1)  # split along dim 1
    shares = [zigzag_split(sequence, 1, cp_size, rank) for rank in range(cp_size)]
    for rank, share in enumerate(shares):
        assert torch.equal(share, sequence[:, zigzag_positions(sequence.shape[1], cp_size, rank)])
        assert torch.all(share[:, 1:] > share[:, :-1])  # local order is global order
    assert sorted(torch.cat(shares, 1)[0].tolist()) == sequence[0].tolist()


def test_indivisible_length_is_a_clear_error() -> None:
    with pytest.raises(ContextParallelLayoutError, match=r"23 is not divisible by 2 x context-parallel size = 4"):
        zigzag_split(torch.zeros(1, 23), 1, 2, 0)


def test_padding_is_a_lossless_trailing_document() -> None:
    batch = {
        "tokens": torch.arange(1, 24).view(1, 23),
        "labels": torch.arange(2, 25).view(1, 23),
        "loss_mask": torch.ones(1, 23),
        "position_ids": torch.arange(23).view(1, 23),
        "cu_seqlens": torch.tensor([0, 1, 20, 23], dtype=torch.int32),
    }
    padded = pad_for_context_parallel(batch, cp_size=4)  # to 24 = multiple of 8
    assert padded["tokens"].shape == (1, 24) and padded["tokens"][0, -1] == 0
    assert padded["loss_mask"][0, -1] == 0 and padded["loss_mask"][0, :23].all()
    assert padded["position_ids"][0, -1] == 23
    assert padded["cu_seqlens"].tolist() == [0, 1, 20, 23, 24] and padded["cu_seqlens"].dtype == torch.int32
    share = split_batch_for_context_parallel(batch, cp_size=4, cp_rank=1)
    assert share["tokens"][0].tolist() == (zigzag_positions(24, 4, 1) + 1).tolist()
    assert torch.equal(share["cu_seqlens"], padded["cu_seqlens"])  # boundaries stay global


def _plan_mask(cp_size: int, rank: int, step_index: int, length: int, cu_seqlens) -> torch.Tensor:
    """The [local q, source kv] visibility the plan's segments cover (causal applied)."""
    step = plan_ring(cp_size, rank, length, cu_seqlens)[step_index]
    mask = torch.zeros(length, length, dtype=torch.bool)
    for seg in step.segments:
        block = torch.ones(seg.q_end - seg.q_start, seg.k_end - seg.k_start, dtype=torch.bool)
        mask[seg.q_start : seg.q_end, seg.k_start : seg.k_end] = block.tril() if step.causal else block
    return mask


@pytest.mark.parametrize("cp_size", [2, 4])
@pytest.mark.parametrize("cu_seqlens", [None, (0, 1, 2, 29, 30, 37, 48)], ids=["causal", "documents"])
def test_plan_covers_exactly_the_visible_pairs(cp_size: int, cu_seqlens) -> None:
    total = 48
    positions = torch.arange(total)
    visible = positions[None, :] <= positions[:, None]
    if cu_seqlens:
        document = torch.bucketize(positions, torch.tensor(cu_seqlens[1:]), right=True)
        visible &= document[:, None] == document[None, :]
    local = total // cp_size
    for rank in range(cp_size):
        mine = zigzag_positions(total, cp_size, rank)
        for step_index, step in enumerate(plan_ring(cp_size, rank, local, cu_seqlens)):
            theirs = zigzag_positions(total, cp_size, step.source)
            expected = visible[mine][:, theirs]
            assert torch.equal(_plan_mask(cp_size, rank, step_index, local, cu_seqlens), expected)


@pytest.mark.parametrize("cp_size", [2, 4, 8])
def test_zigzag_steps_are_balanced(cp_size: int) -> None:
    """Every rank computes the same number of score entries at every ring step."""
    local = 2 * 64
    for step_index in range(cp_size):
        work = {int(_plan_mask(cp_size, rank, step_index, local, None).sum()) for rank in range(cp_size)}
        assert len(work) == 1, (step_index, work)


def test_bad_cu_seqlens_is_a_clear_error() -> None:
    with pytest.raises(ContextParallelLayoutError, match="cu_seqlens must start at 0"):
        plan_ring(2, 0, 8, (0, 5, 3, 16))
