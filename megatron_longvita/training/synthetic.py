"""The CPU smoke job: a tiny Qwen2-style decoder trained on a fixed synthetic batch.

Exercises the whole megatron-core path (parallel_state, TP/SP/PP/VPP/DP, DDP, distributed
optimizer, pipeline schedules) in seconds on CPU/gloo. ``examples/quickstart.sh`` runs it
under TP=2 x PP=2 and the foundation tests check that its loss falls under every layout.

    torchrun --nproc_per_node 4 -m megatron_longvita.training.synthetic --tp 2 --pp 2
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import time
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig

from megatron_longvita.config.parallel import ParallelConfig
from megatron_longvita.models.decoder import DecoderConfig, build_decoder
from megatron_longvita.platform import destroy_distributed, initialize_distributed
from megatron_longvita.training.loop import build_model_chunks, setup_training, train_step

# vocab 100 is deliberately not a multiple of 128 x TP: it exercises vocab padding.
TINY_DECODER = DecoderConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                             num_query_groups=2, vocab_size=100, max_position_embeddings=256)


@dataclass(frozen=True)
class SyntheticRun:
    parallel: ParallelConfig = ParallelConfig()
    steps: int = 30
    lr: float = 3e-3
    seq_length: int = 32
    micro_batch_size: int = 2
    num_microbatches: int = 4  # per data-parallel rank
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    seed: int = 1234


def synthetic_microbatches(run: SyntheticRun, vocab_size: int, dp_rank: int) -> list[dict[str, torch.Tensor]]:
    """A fixed set of random sequences (the same on every rank for the same DP rank)."""
    generator = torch.Generator().manual_seed(run.seed + dp_rank)
    batches = []
    for _ in range(run.num_microbatches):
        sequence = torch.randint(0, vocab_size, (run.micro_batch_size, run.seq_length + 1), generator=generator)
        batches.append({
            "tokens": sequence[:, :-1].contiguous(),
            "labels": sequence[:, 1:].contiguous(),
            "loss_mask": torch.ones(run.micro_batch_size, run.seq_length),
            "position_ids": torch.arange(run.seq_length).expand(run.micro_batch_size, -1).contiguous(),
        })
    return batches


def masked_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron's 3-tuple loss contract: (loss sum, token count, {name: [sum, count]})."""
    loss_sum = (per_token_loss.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach().clone(), num_tokens.float()])}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
    return output, functools.partial(masked_loss, batch["loss_mask"])


def train_synthetic(run: SyntheticRun, log_every: int = 0) -> list[float]:
    """Train under an initialised process group; returns the per-step losses (last stage only)."""
    initialize_distributed(run.parallel, seed=run.seed)
    transformer_config = TINY_DECODER.transformer_config(run.parallel)
    chunks = build_model_chunks(functools.partial(build_decoder, TINY_DECODER, transformer_config))
    state = setup_training(
        chunks,
        OptimizerConfig(optimizer="adam", lr=run.lr, weight_decay=0.0, clip_grad=1.0, bf16=False,
                        use_distributed_optimizer=run.distributed_optimizer),
        overlap_grad_reduce=run.overlap_grad_reduce,
    )
    batches = synthetic_microbatches(run, TINY_DECODER.vocab_size, parallel_state.get_data_parallel_rank())
    losses = []
    for step in range(1, run.steps + 1):
        iterators = [iter(batches) for _ in state.model]
        started = time.perf_counter()
        result = train_step(state, forward_step, iterators if len(iterators) > 1 else iterators[0],
                            run.num_microbatches, run.seq_length, run.micro_batch_size)
        if result.loss is not None:
            losses.append(result.loss)
            if log_every and (step % log_every == 0 or step == 1):
                logging.getLogger(__name__).info(
                    "step %3d  loss %.4f  grad norm %.3f  %.0f ms", step, result.loss, result.grad_norm,
                    1000 * (time.perf_counter() - started))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1)
    parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    parser.add_argument("--vpp", "--virtual-pipeline-model-parallel-size", dest="vpp", type=int, default=None)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--use-distributed-optimizer", action="store_true")
    parser.add_argument("--steps", "--train-iters", dest="steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run = SyntheticRun(ParallelConfig(args.tp, args.pp, 1, args.vpp, args.sequence_parallel),
                       steps=args.steps, lr=args.lr, distributed_optimizer=args.use_distributed_optimizer)
    try:
        losses = train_synthetic(run, log_every=5)
        if losses and parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0:
            print(json.dumps({"first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4),
                              "steps": len(losses), "tp": args.tp, "pp": args.pp}), flush=True)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
