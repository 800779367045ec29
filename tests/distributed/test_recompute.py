"""Full activation recompute gives the gradients of the plain forward (CPU RNG patches in force).

Reference: the same decoder without recompute. Tolerance: exact (recompute replays the same
ops on the same inputs).
"""

from __future__ import annotations

import torch

from megatron_longvita.config.parallel import ParallelConfig
from megatron_longvita.models.decoder import build_decoder
from megatron_longvita.platform import initialize_distributed
from megatron_longvita.training.synthetic import TINY_DECODER
from tests.harness import run_distributed


def _grads(recompute_num_layers: int) -> dict[str, torch.Tensor]:
    parallel = ParallelConfig()
    initialize_distributed(parallel)
    torch.manual_seed(3)
    config = TINY_DECODER.transformer_config(parallel, recompute_num_layers=recompute_num_layers)
    model = build_decoder(TINY_DECODER, config)
    tokens = torch.randint(0, TINY_DECODER.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    positions = torch.arange(16).expand_as(tokens)
    model(tokens, positions, None, labels=tokens.roll(-1, dims=1)).sum().backward()
    return {name: param.grad.clone() for name, param in model.named_parameters()}


def _both() -> tuple[dict, dict]:
    return _grads(0), _grads(TINY_DECODER.num_layers)


def test_recompute_matches_plain_backward() -> None:
    [(plain, recomputed)] = run_distributed(_both, 1)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        assert torch.equal(plain[name], recomputed[name]), name
