"""Exact resume: 2k steps straight == k steps, stop, resume, k more (CPU, fp32).

Compared bit-exactly: the per-step losses after the restart and the final weights. The
checkpoint holds model, optimizer (distributed: dp_reshardable), scheduler and RNG state.
"""

from __future__ import annotations

import pytest
import torch

from megatron_longvita.checkpoint.dist import latest_checkpoint_dir, load_model
from megatron_longvita.config.parallel import ParallelConfig
from megatron_longvita.platform import initialize_distributed
from megatron_longvita.training.synthetic import SyntheticRun, build_tiny_decoder_chunks, train_synthetic
from tests.harness import run_distributed
from tests.weights import tensor_state

K = 4
LAYOUTS = {
    "dp2-distopt": (2, SyntheticRun(steps=2 * K, distributed_optimizer=True)),
    "tp2": (2, SyntheticRun(ParallelConfig(tensor_model_parallel_size=2), steps=2 * K)),
    "pp2": (2, SyntheticRun(ParallelConfig(pipeline_model_parallel_size=2), steps=2 * K)),
}


def final_weights(run: SyntheticRun, checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """The weights of the latest training checkpoint, gathered at TP=PP=1 on this rank."""
    initialize_distributed(ParallelConfig(), seed=run.seed)
    [chunk] = build_tiny_decoder_chunks(SyntheticRun())
    load_model([chunk], latest_checkpoint_dir(checkpoint_dir))
    return tensor_state(chunk)


def _last_stage_losses(per_rank: list[list[float]]) -> list[float]:
    return next(losses for losses in per_rank if losses)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_is_bit_exact(layout: str, tmp_path) -> None:
    world_size, run = LAYOUTS[layout]
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    init = str(tmp_path / "init")
    run_distributed(train_synthetic, 1, SyntheticRun(steps=1), initial_weights_dir=init, stop_after=0)
    expected = _last_stage_losses(
        run_distributed(train_synthetic, world_size, run, load_dir=init, checkpoint_dir=straight, save_interval=2 * K)
    )
    first = _last_stage_losses(
        run_distributed(
            train_synthetic, world_size, run, load_dir=init, checkpoint_dir=interrupted, save_interval=K, stop_after=K
        )
    )
    second = _last_stage_losses(
        run_distributed(train_synthetic, world_size, run, checkpoint_dir=interrupted, save_interval=K)
    )
    assert first + second == expected
    [reference_weights] = run_distributed(final_weights, 1, run, straight)
    [resumed_weights] = run_distributed(final_weights, 1, run, interrupted)
    for name, value in reference_weights.items():
        assert torch.equal(resumed_weights[name], value), name
