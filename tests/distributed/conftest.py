"""Fixtures shared by the distributed tests."""

from __future__ import annotations

import pytest

from tests.harness import run_distributed
from tests.references import hf2mcore_rank, save_tiny_internvl, transformers_greedy


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny InternVL checkpoint converted to megatron (root/hf, root/mcore) and transformers' greedy reference."""
    root = tmp_path_factory.mktemp("parity")
    save_tiny_internvl(str(root / "hf"))
    run_distributed(hf2mcore_rank, 1, str(root / "hf"), str(root / "mcore"))
    return root, transformers_greedy(str(root / "hf"))
