"""The CPU smoke job: a tiny Qwen2-style decoder trained on a fixed synthetic batch.

Exercises the whole megatron-core path (parallel_state, TP/SP/PP/VPP/DP, DDP, distributed
optimizer, pipeline schedules, dist_checkpointing) in seconds on CPU/gloo.
``examples/quickstart.sh`` runs it under TP=2 x PP=2; the foundation tests check that every
layout gives the single-rank loss curve.

    torchrun --nproc_per_node 4 -m megatron_longvita.training.synthetic --tp 2 --pp 2
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig

from megatron_longvita.checkpoint.dist import load_model, load_training_checkpoint, save_model, save_training_checkpoint
from megatron_longvita.config.parallel import ParallelConfig, add_parallel_arguments, parallel_config_from_args
from megatron_longvita.config.train import ScheduleConfig
from megatron_longvita.models.decoder import DecoderConfig, build_decoder
from megatron_longvita.platform import Platform, destroy_distributed, initialize_distributed, setup_platform
from megatron_longvita.training.loop import build_model_chunks, is_logging_rank, masked_loss, setup_training, train_step

logger = logging.getLogger(__name__)

# vocab 100 is deliberately not a multiple of 128: it exercises vocab padding.
TINY_DECODER = DecoderConfig(
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=100,
    max_position_embeddings=256,
)


@dataclass(frozen=True)
class SyntheticRun:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    steps: int = 30
    lr: float = 3e-3
    seq_length: int = 32
    micro_batch_size: int = 2
    global_microbatches: int = 4  # split over data-parallel ranks
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    params_dtype: torch.dtype = torch.float32
    seed: int = 1234


def synthetic_microbatches(run: SyntheticRun, vocab_size: int) -> list[dict[str, torch.Tensor]]:
    """This data-parallel rank's share of a fixed global batch of random sequences."""
    generator = torch.Generator().manual_seed(run.seed)
    sequences = torch.randint(
        0, vocab_size, (run.global_microbatches, run.micro_batch_size, run.seq_length + 1), generator=generator
    )
    # ~30% of targets unlabelled, unevenly per micro-batch: the loss must be the per-token mean
    # over the global batch, not a mean of per-micro-batch means
    loss_masks = (torch.rand(sequences[..., 1:].shape, generator=generator) > 0.3).float()
    dp_size = parallel_state.get_data_parallel_world_size()
    if run.global_microbatches % dp_size:
        raise ValueError(f"{run.global_microbatches} micro-batches cannot be split over {dp_size} DP ranks")
    per_rank = run.global_microbatches // dp_size
    first = parallel_state.get_data_parallel_rank() * per_rank
    positions = torch.arange(run.seq_length).expand(run.micro_batch_size, -1).contiguous()
    return [
        {
            "tokens": sequence[:, :-1].contiguous(),
            "labels": sequence[:, 1:].contiguous(),
            "loss_mask": loss_mask,
            "position_ids": positions,
        }
        for sequence, loss_mask in zip(sequences[first : first + per_rank], loss_masks[first : first + per_rank])
    ]


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
    return output, functools.partial(masked_loss, batch["loss_mask"])


def build_tiny_decoder_chunks(run: SyntheticRun, platform: Optional[Platform] = None) -> list:
    transformer_config = TINY_DECODER.transformer_config(run.parallel, params_dtype=run.params_dtype, platform=platform)
    return build_model_chunks(functools.partial(build_decoder, TINY_DECODER, transformer_config, platform=platform))


def train_synthetic(
    run: SyntheticRun,
    load_dir: Optional[str] = None,
    initial_weights_dir: Optional[str] = None,
    log_every: int = 0,
    checkpoint_dir: Optional[str] = None,
    save_interval: int = 0,
    stop_after: Optional[int] = None,
    platform: Optional[Platform] = None,
) -> list[float]:
    """Train from scratch or from the weights in `load_dir`; returns per-step losses (empty off
    the last stage). `initial_weights_dir` receives the weights training starts from (a dist
    checkpoint another layout can `load_dir`). With `checkpoint_dir`, resume from its latest
    training checkpoint and save one every `save_interval` steps; `stop_after` ends the run
    early (a simulated interruption). `platform`: default the detected one, its patches applied
    by the caller (main does).
    """
    initialize_distributed(run.parallel, seed=run.seed, platform=platform)
    chunks = build_tiny_decoder_chunks(run, platform)
    if load_dir:
        load_model(chunks, load_dir)
    if initial_weights_dir:
        save_model(chunks, initial_weights_dir)
    state = setup_training(
        chunks,
        OptimizerConfig(
            optimizer="adam",
            lr=run.lr,
            min_lr=run.lr / 10,
            weight_decay=0.0,
            clip_grad=1.0,
            bf16=run.params_dtype == torch.bfloat16,
            params_dtype=run.params_dtype,
            use_distributed_optimizer=run.distributed_optimizer,
        ),
        overlap_grad_reduce=run.overlap_grad_reduce,
        schedule=ScheduleConfig(train_iters=run.steps, lr_warmup_fraction=0.1),
    )
    batches = synthetic_microbatches(run, TINY_DECODER.vocab_size)
    first_step = 1
    if checkpoint_dir:
        resumed = load_training_checkpoint(checkpoint_dir, state.model, state.optimizer, state.scheduler)
        first_step = resumed.iteration + 1 if resumed else 1
    losses = []
    for step in range(first_step, (run.steps if stop_after is None else stop_after) + 1):
        iterators = [iter(batches) for _ in state.model]
        started = time.perf_counter()
        result = train_step(
            state,
            forward_step,
            iterators if len(iterators) > 1 else iterators[0],
            len(batches),
            run.seq_length,
            run.micro_batch_size,
        )
        if result.loss is not None:
            losses.append(result.loss)
            if log_every and is_logging_rank() and (step % log_every == 0 or step == 1):
                logger.info(
                    "step %3d  loss %.4f  grad norm %.3f  %.0f ms",
                    step,
                    result.loss,
                    result.grad_norm,
                    1000 * (time.perf_counter() - started),
                )
        if checkpoint_dir and save_interval and step % save_interval == 0:
            save_training_checkpoint(checkpoint_dir, step, state.model, state.optimizer, state.scheduler, None)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_parallel_arguments(
        parser,
        (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "virtual_pipeline_model_parallel_size",
            "sequence_parallel",
        ),
    )
    parser.add_argument("--use-distributed-optimizer", action="store_true")
    parser.add_argument("--steps", "--train-iters", dest="steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--save-initial-weights", default=None, help="write the weights training starts from here (a dist checkpoint)"
    )
    parser.add_argument("--load", default=None, help="start from this dist checkpoint (any layout)")
    parser.add_argument("--checkpoint-dir", default=None, help="resume from / save training checkpoints here")
    parser.add_argument("--save-interval", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lists every parameter
    parallel = parallel_config_from_args(args)
    run = SyntheticRun(parallel, steps=args.steps, lr=args.lr, distributed_optimizer=args.use_distributed_optimizer)
    platform = setup_platform()
    try:
        losses = train_synthetic(
            run,
            load_dir=args.load,
            initial_weights_dir=args.save_initial_weights,
            log_every=5,
            checkpoint_dir=args.checkpoint_dir,
            save_interval=args.save_interval,
            platform=platform,
        )
        if losses and is_logging_rank():
            print(
                json.dumps(
                    {
                        "first_loss": round(losses[0], 4),
                        "final_loss": round(losses[-1], 4),
                        "steps": len(losses),
                        "tp": parallel.tensor_model_parallel_size,
                        "pp": parallel.pipeline_model_parallel_size,
                    }
                ),
                flush=True,
            )
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
