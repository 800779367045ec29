"""The declared patch registry: idempotent, version-checked, listable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_longvita import patches
from megatron_longvita.patches import Patch, PatchTargetError, PatchVersionError


def test_cpu_set_applies_once() -> None:
    first = patches.apply_platform_patches("cpu")
    current_device = torch.cuda.current_device
    second = patches.apply_platform_patches("cpu")
    assert [r.replacement for r in first] == [r.replacement for r in second]
    assert torch.cuda.current_device is current_device  # not wrapped twice
    assert torch.cuda.current_device() == torch.device("cpu")


def test_every_patch_is_declared_with_reason_and_versions() -> None:
    for patch in patches.declared("cpu"):
        assert patch.reason and patch.versions and patch.target.count(".") >= 2


def test_unsupported_version_fails_fast_naming_the_patch() -> None:
    too_new = Patch("needs-ancient-megatron", "json.dumps", lambda original: original, "test", ("cpu",), "<0.1")
    with pytest.raises(PatchVersionError, match="needs-ancient-megatron"):
        patches.apply(too_new)


def test_missing_target_is_named() -> None:
    moved = Patch(
        "moved-upstream",
        "megatron.core.transformer.utils.no_such_function",
        lambda original: original,
        "test",
        ("cpu",),
        ">=0.16",
    )
    with pytest.raises(PatchTargetError, match="no_such_function"):
        patches.apply(moved)


def test_npu_without_vendor_stack_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="torch_npu and MindSpeed"):
        patches.apply_platform_patches("npu")


def test_cli_lists_the_patches_in_force() -> None:
    listing = subprocess.run(
        [sys.executable, "-m", "megatron_longvita.patches", "--json"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "LONGVITA_PLATFORM": "cpu"},
    )
    rows = [json.loads(line) for line in listing.stdout.splitlines()]
    assert [row["name"] for row in rows] == [p.name for p in patches.declared("cpu")]
    assert all(row["installed"] for row in rows)


def test_cpu_rope_split_is_the_zigzag_layout() -> None:
    """The CPU replacement of megatron's get_pos_emb_on_this_cp_rank cuts RoPE as zigzag_split cuts batches."""
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    from megatron_longvita.parallel import zigzag_split

    patches.apply_platform_patches("cpu")

    class Group:
        def __init__(self, size: int, rank: int) -> None:
            self._size, self._rank = size, rank

        def size(self) -> int:
            return self._size

        def rank(self) -> int:
            return self._rank

    table = torch.arange(24.0).view(24, 1, 1, 1)
    for size in (1, 2, 3):
        for rank in range(size):
            got = rotary_pos_embedding.get_pos_emb_on_this_cp_rank(table, 0, Group(size, rank))
            assert torch.equal(got, zigzag_split(table, 0, size, rank))
