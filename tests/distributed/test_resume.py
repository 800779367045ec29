"""Exact resume: 2k steps straight == k steps, stop, resume, k more (CPU, fp32).

Compared bit-exactly: the per-step losses after the restart and the final weights. The
checkpoint holds model, optimizer (distributed: dp_reshardable), scheduler and RNG state.
"""

from __future__ import annotations

import pytest
import torch

from megatron_longvita.config.parallel import ParallelConfig
from megatron_longvita.training.synthetic import SyntheticRun, final_weights, train_synthetic
from tests.harness import run_distributed

K = 4
LAYOUTS = {
    "dp2-distopt": (2, SyntheticRun(steps=2 * K, distributed_optimizer=True)),
    "tp2": (2, SyntheticRun(ParallelConfig(tensor_model_parallel_size=2), steps=2 * K)),
    "pp2": (2, SyntheticRun(ParallelConfig(pipeline_model_parallel_size=2), steps=2 * K)),
}


def _last_stage_losses(per_rank: list[list[float]]) -> list[float]:
    return next(losses for losses in per_rank if losses)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_is_bit_exact(layout: str, tmp_path) -> None:
    world_size, run = LAYOUTS[layout]
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    init = str(tmp_path / "init")
    run_distributed(train_synthetic, 1, SyntheticRun(steps=1), save_dir=init, stop_after=0)
    expected = _last_stage_losses(run_distributed(train_synthetic, world_size, run, load_dir=init,
                                                  checkpoint_dir=straight, save_interval=2 * K))
    first = _last_stage_losses(run_distributed(train_synthetic, world_size, run, load_dir=init,
                                               checkpoint_dir=interrupted, save_interval=K, stop_after=K))
    second = _last_stage_losses(run_distributed(train_synthetic, world_size, run, checkpoint_dir=interrupted,
                                                save_interval=K))
    assert first + second == expected
    [reference_weights] = run_distributed(final_weights, 1, run, straight)
    [resumed_weights] = run_distributed(final_weights, 1, run, interrupted)
    for name, value in reference_weights.items():
        assert torch.equal(resumed_weights[name], value), name
