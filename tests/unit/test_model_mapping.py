"""The mapping table's transforms: exact inverses, and megatron's fused layouts (docs/design.md, "Checkpoint names")."""

from __future__ import annotations

import pytest
import torch

from megatron_longvita.checkpoint.mapping import transforms
from megatron_longvita.models.presets import get_preset

TINY = get_preset("tiny")  # LLM: 4 heads, 2 groups, head dim 16; vision: 2 heads, head dim 16
HF_SHAPES = {
    "qkv": [(64, 64), (32, 64), (32, 64)],
    "vision_qkv": [(32, 32)] * 3,
    "vision_fused_qkv": [(96, 32)],
    "gated_mlp": [(128, 64), (128, 64)],
    "vocab": [(300, 64)],
    "copy": [(7, 3)],
}


@pytest.mark.parametrize("name", sorted(HF_SHAPES))
def test_transforms_round_trip_bit_exactly(name: str) -> None:
    transform = transforms(TINY)[name]
    hf = [torch.randn(shape) for shape in HF_SHAPES[name]]
    back = transform.to_hf(transform.to_mcore(hf))
    assert len(back) == len(hf) and all(torch.equal(a, b) for a, b in zip(back, hf))
    bias = [torch.randn(shape[0]) for shape in HF_SHAPES[name]]  # biases follow the same row layout
    if name != "vocab":
        assert all(torch.equal(a, b) for a, b in zip(transform.to_hf(transform.to_mcore(bias)), bias))


def _labelled(rows: int, label: float) -> torch.Tensor:
    return torch.full((rows, 1), label)


def test_gqa_qkv_is_laid_out_per_query_group() -> None:
    # 4 heads / 2 groups / head dim 16: [q0 q1 k0 v0 | q2 q3 k1 v1], each block 16 rows.
    q = torch.cat([_labelled(16, h) for h in range(4)])
    k = torch.cat([_labelled(16, 10 + g) for g in range(2)])
    v = torch.cat([_labelled(16, 20 + g) for g in range(2)])
    fused = transforms(TINY)["qkv"].to_mcore([q, k, v])
    assert fused[::16, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


def test_internvit_fused_qkv_is_laid_out_per_head() -> None:
    # InternViT stacks [q; k; v] (each all heads); megatron wants [q0 k0 v0 | q1 k1 v1].
    stacked = torch.cat([_labelled(16, 10 * part + head) for part in range(3) for head in range(2)])
    fused = transforms(TINY)["vision_fused_qkv"].to_mcore([stacked])
    assert fused[::16, 0].tolist() == [0, 10, 20, 1, 11, 21]


def test_gated_mlp_is_gate_then_up() -> None:
    fused = transforms(TINY)["gated_mlp"].to_mcore([_labelled(128, 1), _labelled(128, 2)])
    assert fused[0, 0] == 1 and fused[128, 0] == 2


def test_vocab_rows_are_padded_for_tp_and_dropped_back() -> None:
    table = torch.randn(300, 64)
    padded = transforms(TINY)["vocab"].to_mcore([table])
    assert padded.shape == (TINY.decoder.padded_vocab_size(1), 64) == (384, 64)
    assert torch.equal(padded[:300], table) and not padded[300:].any()
