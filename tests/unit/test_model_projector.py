"""Pixel shuffle ordering against transformers' InternVL, and the projector's geometry."""

from __future__ import annotations

import pytest
import torch

from megatron_longvita.models.projector import ProjectorConfig, pixel_shuffle


@pytest.mark.parametrize("rows, cols", [(4, 4), (4, 6), (32, 32)])
def test_pixel_shuffle_matches_transformers(rows: int, cols: int) -> None:
    from transformers.models.internvl.modeling_internvl import InternVLModel

    features = torch.randn(3, rows, cols, 8)
    expected = InternVLModel.pixel_shuffle(None, features, scale_factor=0.5)
    assert torch.equal(pixel_shuffle(features, 0.5), expected)


def test_pixel_shuffle_groups_2x2_neighbourhoods() -> None:
    # One channel holding each patch's (row, col): output token (0, 0) must gather patches
    # (0,0), (0,1), (1,0), (1,1) and nothing from another 2x2 block.
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), dim=-1).float()
    token = pixel_shuffle(grid.unsqueeze(0), 0.5)[0, 0, 0].view(4, 2)
    assert sorted(map(tuple, token.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_pixel_shuffle_rejects_an_odd_grid() -> None:
    with pytest.raises(ValueError, match="does not divide the 5x4 patch grid"):
        pixel_shuffle(torch.randn(1, 5, 4, 8), 0.5)


def test_channel_multiplier() -> None:
    assert ProjectorConfig(downsample_ratio=0.5).channel_multiplier == 4
