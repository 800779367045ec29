"""The training step on megatron-core's machinery: DDP, megatron optimizer, pipeline schedules."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import (
    MegatronOptimizer,
    OptimizerConfig,
    ParamKey,
    get_megatron_optimizer,
    get_standard_config_overrides,
)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import MegatronModule, TransformerConfig

from megatron_longvita.config.train import ScheduleConfig
from megatron_longvita.models.long_vita import ModelProvider


def build_model_chunks(provider: ModelProvider) -> list[MegatronModule]:
    """One chunk per virtual pipeline stage (a single chunk without interleaving)."""
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    stages = [None] if vpp is None else list(range(vpp))
    return [
        provider(
            parallel_state.is_pipeline_first_stage(ignore_virtual=vpp is None, vp_stage=stage),
            parallel_state.is_pipeline_last_stage(ignore_virtual=vpp is None, vp_stage=stage),
            stage,
        )
        for stage in stages
    ]


def build_scheduler(
    schedule: ScheduleConfig, optimizer: MegatronOptimizer, config: OptimizerConfig
) -> OptimizerParamScheduler:
    """megatron's scheduler for ``schedule``; peak and final LR come from the optimizer config
    (megatron keeps them per param group)."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=config.lr,
        min_lr=config.min_lr,
        lr_warmup_steps=int(schedule.lr_warmup_fraction * schedule.train_iters),
        lr_decay_steps=schedule.train_iters,
        lr_decay_style=schedule.lr_decay_style,
        start_wd=0.0,
        end_wd=0.0,
        wd_incr_steps=schedule.train_iters,
        wd_incr_style="constant",
    )


@dataclass
class TrainState:
    model: list[DistributedDataParallel]
    optimizer: MegatronOptimizer
    config: TransformerConfig
    scheduler: Optional[OptimizerParamScheduler] = None


def setup_training(
    chunks: list[MegatronModule],
    optimizer_config: OptimizerConfig,
    overlap_grad_reduce: bool = False,
    schedule: Optional[ScheduleConfig] = None,
    config_overrides: Optional[dict[ParamKey, dict]] = None,
) -> TrainState:
    """Wrap chunks in megatron DDP, build the optimizer and wire the schedule hooks."""
    config = chunks[0].config
    # The loss is the per-token mean over the whole global batch (all micro-batches, DP and
    # CP ranks): finalize_model_grads divides by the total token count instead of each
    # micro-batch by its own. DDP reads this when it is built (no 1/DP gradient scaling).
    config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=optimizer_config.use_distributed_optimizer,
    )
    model = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    for chunk in model:
        chunk.broadcast_params()
    if config_overrides:  # keep megatron's defaults (no weight decay on biases and norms) beside ours
        config_overrides = {**get_standard_config_overrides(optimizer_config), **config_overrides}
    optimizer = get_megatron_optimizer(optimizer_config, model, config_overrides=config_overrides)
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in model]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if config.virtual_pipeline_model_parallel_size is not None:
        # batch_isend_irecv with interleaving gives silently wrong grads on gloo
        # (Megatron-LM issues #750/#1450).
        config.batch_p2p_comm = False
        config.overlap_p2p_comm = True
    scheduler = build_scheduler(schedule, optimizer, optimizer_config) if schedule else None
    return TrainState(model, optimizer, config, scheduler)


def is_logging_rank() -> bool:
    """The one rank that reports the loss: last pipeline stage, first of its TP, DP and CP groups."""
    return (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0
    )


def masked_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron's 3-tuple loss contract: (loss sum, token count, {name: [sum, count]})."""
    loss_sum = (per_token_loss.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach().clone(), num_tokens.float()])}


@dataclass
class StepResult:
    loss: Optional[float]  # per-token mean over the global batch; None off the last pipeline stage
    grad_norm: Optional[float]
    update_successful: bool


def train_step(
    state: TrainState,
    forward_step: Callable,
    data_iterator: Iterator | list[Iterator],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> StepResult:
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=state.model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    update_successful, grad_norm, _ = state.optimizer.step()
    if state.scheduler is not None and update_successful:
        state.scheduler.step(increment=1)
    loss = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        # each micro-batch reports [loss sum, token count]
        total = torch.stack([item["lm loss"] for item in losses]).sum(dim=0)
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
        loss = (total[0] / total[1].clamp(min=1)).item()
    return StepResult(loss, grad_norm, update_successful)
