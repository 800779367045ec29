"""Presets: the 14B model instantiates on the meta device with the released checkpoint's parameter
count (computed here from the component configs); geometry and placeholder ids agree with the
data pipeline."""

from __future__ import annotations

import pytest
import torch

from megatron_longvita.config.data import MediaConfig
from megatron_longvita.config.parallel import ConfigError, ParallelConfig
from megatron_longvita.models.presets import PRESETS, get_preset
from tests.harness import run_distributed


def qwen25_14b_params() -> int:
    """Qwen2.5-14B from its published config.json (14.77B incl. embeddings)."""
    hidden, ffn, layers, vocab, kv = 5120, 13824, 48, 152064, 8 * 128
    attention = hidden * hidden + hidden + 2 * (hidden * kv + kv) + hidden * hidden  # q (+bias), k, v (+bias), o
    layer = attention + 3 * hidden * ffn + 2 * hidden  # SwiGLU gate/up/down, two RMSNorms
    return layers * layer + 2 * vocab * hidden + hidden  # untied embedding + lm_head, final norm


def internvit_300m_params() -> int:
    """InternViT-300M-448px: 24 layers, hidden 1024, MLP 4096, 448/14 -> 1024 patches + class token."""
    hidden, ffn, layers = 1024, 4096, 24
    layer = (
        (3 * hidden * hidden + 3 * hidden)
        + (hidden * hidden + hidden)
        + (hidden * ffn + ffn)
        + (ffn * hidden + hidden)
        + 4 * hidden
        + 2 * hidden
    )  # qkv, proj, fc1, fc2, 2 LayerNorms, ls1/ls2
    embeddings = hidden * 3 * 14 * 14 + hidden + hidden + 1025 * hidden  # conv (+bias), class token, positions
    return layers * layer + embeddings


def projector_params(vit_hidden: int = 1024, llm_hidden: int = 5120, downsample_ratio: float = 0.5) -> int:
    """Long-VITA's ResamplerProjector: LayerNorm(4 x vit) -> Linear(4 x vit -> vit) -> GELU ->
    Linear(vit -> llm), no biases (4096 -> 1024 -> 5120 for 14B)."""
    width = vit_hidden * int(1 / downsample_ratio) ** 2
    return 2 * width + width * vit_hidden + vit_hidden * llm_hidden


def count_on_meta(preset: str) -> dict[str, int]:
    from megatron_longvita.models.long_vita import build_long_vita
    from megatron_longvita.platform import initialize_distributed

    initialize_distributed(ParallelConfig())
    with torch.device("meta"):
        model = build_long_vita(get_preset(preset), ParallelConfig(), params_dtype=torch.bfloat16)
    assert all(p.is_meta for p in model.parameters())
    return {
        part: sum(p.numel() for p in getattr(model, part).parameters())
        for part in ("language_model", "vision", "projector")
    }


def test_14b_preset_on_meta_matches_the_released_checkpoint() -> None:
    [counts] = run_distributed(count_on_meta, 1, "qwen2.5-14b")
    assert qwen25_14b_params() == 14_770_033_664
    assert internvit_300m_params() == 304_012_288
    assert projector_params() == 9_445_376
    assert counts == {
        "language_model": qwen25_14b_params(),
        "vision": internvit_300m_params(),
        "projector": projector_params(),
    }
    assert sum(counts.values()) == 15_083_491_328


def test_presets_are_registered() -> None:
    assert PRESETS.names() == ["qwen2.5-14b", "qwen2.5-72b", "qwen2.5-7b", "tiny"]


def test_geometry_feeds_the_data_pipeline() -> None:
    config = get_preset("qwen2.5-14b")
    assert config.tokens_per_tile == MediaConfig.from_model_config(config).tokens_per_tile == 256
    assert get_preset("tiny").tokens_per_tile == 4


def test_context_ids_follow_the_special_token_order() -> None:
    # Stock Qwen2.5 has 151,665 tokens; <img> = 151665, <IMG_CONTEXT> = 151667 (docs/design.md, "Token layout").
    assert get_preset("qwen2.5-14b").context_token_ids == (151667, 151673, 151670)


def test_layouts_megatron_cannot_build_are_named() -> None:
    with pytest.raises(ConfigError, match=r"--tensor-model-parallel-size 16 does not divide the LLM attention heads"):
        get_preset("qwen2.5-14b").validate_parallel(16, 1)
    with pytest.raises(ConfigError, match="--pipeline-model-parallel-size 5"):
        get_preset("qwen2.5-14b").validate_parallel(8, 5)
