"""The training driver's data: one loader per TP x CP group, micro-batches broadcast to the
group's other ranks. Every rank must get exactly what a plain single-process loader gives
its data-parallel rank (tensors equal bit for bit, stats equal), and only the group's first
rank may hold a loader (and the data state saved in checkpoints)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_longvita.config.parallel import ParallelConfig
from megatron_longvita.config.train import TrainConfig, load_yaml
from megatron_longvita.data import ChatTokenizer, build_data_loader
from megatron_longvita.data.synthetic import make_corpus
from megatron_longvita.models.presets import get_preset
from tests.harness import run_distributed

TINY_YAML = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_stage1.yaml"
BATCHES = 3

LAYOUTS = {  # world size, layout
    "tp2": (2, ParallelConfig(tensor_model_parallel_size=2)),
    "cp2": (2, ParallelConfig(context_parallel_size=2)),
    "tp2-dp2": (4, ParallelConfig(tensor_model_parallel_size=2)),
}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> TrainConfig:
    model = get_preset("tiny")
    made = make_corpus(
        str(tmp_path_factory.mktemp("corpus")),
        model.image_token_id,
        model.image_size,
        num_images=12,
        num_videos=1,
        num_test=0,
    )
    config = load_yaml(str(TINY_YAML))
    return dataclasses.replace(
        config, data=dataclasses.replace(config.data, mixture=made.mixture, tokenizer=made.tokenizer_dir, num_workers=1)
    )


def _rank_batches(config: TrainConfig) -> dict:
    from megatron.core import parallel_state

    from megatron_longvita.platform import current_platform, initialize_distributed
    from megatron_longvita.train import build_loader, resolve_model

    initialize_distributed(config.parallel, seed=config.seed)
    loader = build_loader(
        config, resolve_model(config, ChatTokenizer.from_dir(config.data.tokenizer)), current_platform()
    )
    batches = [batch for batch, _ in zip(loader, range(BATCHES))]
    return {
        "dp_rank": parallel_state.get_data_parallel_rank(),
        "batches": batches,
        "has_loader": loader.loader is not None,
        "state": loader.state_dict(),
    }


def _reference_batches(config: TrainConfig, dp_rank: int, dp_size: int) -> list[dict]:
    data = config.data
    loader = build_data_loader(
        dataclasses.replace(
            data,
            media=data.media.with_geometry_of(get_preset("tiny")),
            seed=config.seed,
            dp_rank=dp_rank,
            dp_size=dp_size,
            num_workers=0,
        )
    )
    return [batch for batch, _ in zip(loader, range(BATCHES))]


def _assert_same(got: dict, expected: dict, where: str) -> None:
    assert got.keys() == expected.keys(), where
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), f"{where}: {key} differs"
        else:
            assert got[key] == value, f"{where}: {key} differs"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_rank_gets_its_data_parallel_ranks_batches_from_one_loader_per_group(config, layout: str) -> None:
    world_size, parallel = LAYOUTS[layout]
    ranks = run_distributed(_rank_batches, world_size, dataclasses.replace(config, parallel=parallel))
    dp_size = world_size // (parallel.tensor_model_parallel_size * parallel.context_parallel_size)
    references = {dp: _reference_batches(config, dp, dp_size) for dp in range(dp_size)}
    group_size = world_size // dp_size  # megatron orders ranks TP fastest, then CP, then DP
    for rank, result in enumerate(ranks):
        assert result["has_loader"] == (rank % group_size == 0), f"rank {rank}"
        assert (result["state"] is None) != result["has_loader"], f"rank {rank}: data state"
        for step, (got, expected) in enumerate(zip(result["batches"], references[result["dp_rank"]], strict=True)):
            _assert_same(got, expected, f"{layout} rank {rank} batch {step}")
    assert any(
        ref["pixel_values"] is not None and ref["pixel_values"].numel() for refs in references.values() for ref in refs
    ), "no batch carried media: the test proves little"
