"""The one layer-spec selector over the one registry of layer specs."""

from __future__ import annotations

import logging

import pytest

from megatron_longvita.models import specs
from megatron_longvita.models.specs import INFERENCE, LAYER_SPECS, LLM, TRAIN, VISION, get_layer_spec, select_layer_spec
from megatron_longvita.platform import Platform, describe_platform

CPU = describe_platform("cpu")
CUDA_TE = Platform("cuda", "nccl", "cuda", "flash_attn", True)


@pytest.mark.parametrize(
    "tower, platform, cp, packed, purpose, expected",
    [
        (LLM, CPU, 1, False, TRAIN, "local"),
        (LLM, CPU, 2, False, TRAIN, "local_ring"),
        (LLM, CPU, 1, True, TRAIN, "local_ring"),  # reset packing keeps documents apart at CP=1 too
        (LLM, CPU, 2, False, INFERENCE, "local_ring_cached"),
        (LLM, CUDA_TE, 4, True, TRAIN, "transformer_engine"),
        (LLM, CUDA_TE, 1, False, INFERENCE, "local_ring_cached"),
        (VISION, CPU, 1, False, TRAIN, "vision_local"),
        (VISION, CUDA_TE, 1, False, INFERENCE, "vision_transformer_engine"),
    ],
)
def test_selection(tower, platform, cp, packed, purpose, expected) -> None:
    name = select_layer_spec(tower, platform, context_parallel_size=cp, packed_documents=packed, purpose=purpose)
    assert name == expected and get_layer_spec(name, tower).tower == tower


def test_every_spec_lives_in_the_specs_module_with_a_tower() -> None:
    """Including the engine's cached attention: it exists without importing the inference package."""
    for name in LAYER_SPECS:
        spec = LAYER_SPECS.get(name)
        assert spec.tower in (LLM, VISION) and spec.build.__module__ == "megatron_longvita.models.specs", name


def test_a_spec_of_the_other_tower_is_refused() -> None:
    with pytest.raises(ValueError, match="'vision_local' builds vision layers, not llm layers"):
        get_layer_spec("vision_local", LLM)


def test_each_choice_is_logged_once(caplog, monkeypatch) -> None:
    monkeypatch.setattr(specs, "_logged_choices", set())
    with caplog.at_level(logging.INFO, logger="megatron_longvita.models.specs"):
        for _ in range(3):
            select_layer_spec(LLM, CPU, context_parallel_size=2)
    assert [r.getMessage() for r in caplog.records] == [
        "llm layer spec for train on cpu: local_ring (no TE; CP=2, packed documents kept apart=False)"
    ]
