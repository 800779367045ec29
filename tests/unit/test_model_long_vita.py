"""LongVitaModel pieces: placeholder scatter, freezing, recompute knobs, pipeline placement."""

from __future__ import annotations

import pytest
import torch

from megatron_longvita.config.parallel import ParallelConfig
from megatron_longvita.models.long_vita import MODEL_PROVIDERS, scatter_vision_embeddings
from megatron_longvita.models.presets import get_preset
from tests.harness import run_distributed

TINY = get_preset("tiny")


def test_vision_tokens_fill_placeholders_batch_major_in_order() -> None:
    embeddings = torch.zeros(3, 2, 1)  # [s, b, h]
    placeholders = torch.tensor([[True, False, True], [False, True, False]])  # [b, s]
    features = torch.tensor([[1.0], [2.0], [3.0]])
    out = scatter_vision_embeddings(embeddings, features, placeholders, sequence_parallel=False)
    assert out[:, 0, 0].tolist() == [1, 0, 2] and out[:, 1, 0].tolist() == [0, 3, 0]


def test_placeholder_count_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="2 vision placeholder tokens but the tiles give 3"):
        scatter_vision_embeddings(torch.zeros(2, 1, 1), torch.zeros(3, 1), torch.tensor([[True, True]]), False)


def freeze_and_recompute() -> dict[str, object]:
    from megatron_longvita.platform import initialize_distributed

    initialize_distributed(ParallelConfig())
    build = MODEL_PROVIDERS.get("long_vita")
    recomputing = build(TINY, ParallelConfig(), recompute_language_layers=1, recompute_vision_layers=2)(
        True, True, None
    )
    provider = build(TINY, ParallelConfig())
    model = provider(True, True, None)
    model.freeze(vision=True, language_model=True)  # stage 1: projector only
    ids = torch.tensor([[1, 2] + [TINY.image_token_id] * TINY.tokens_per_tile + [3, 4]])
    loss = model(
        ids,
        torch.arange(ids.shape[1]).unsqueeze(0),
        None,
        pixel_values=torch.randn(1, 3, 56, 56),
        labels=torch.roll(ids, -1, dims=1),
    )
    loss.sum().backward()

    def parts(keep) -> set[str]:
        return {name.split(".")[0] for name, param in model.named_parameters() if keep(param)}

    return {
        "with_grad": parts(lambda p: p.grad is not None),
        "trainable": parts(lambda p: p.requires_grad),
        "recompute": (
            recomputing.language_model.config.recompute_num_layers,
            recomputing.vision.config.recompute_num_layers,
        ),
        "later_stage_parts": [name for name, _ in provider(False, True, None).named_children()],
    }


def test_freeze_recompute_and_stage_placement() -> None:
    [result] = run_distributed(freeze_and_recompute, 1)
    assert result["trainable"] == result["with_grad"] == {"projector"}
    assert result["recompute"] == (1, 2)
    assert result["later_stage_parts"] == ["language_model"]  # vision + projector only on stage 0
