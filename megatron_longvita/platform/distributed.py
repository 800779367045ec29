"""One call from Megatron-style arguments to torch.distributed + megatron parallel_state."""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from megatron_longvita.config.parallel import ParallelConfig

logger = logging.getLogger(__name__)


def initialize_distributed(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: int = 30) -> None:
    """Initialise the default process group (torchrun env vars) and megatron's groups.

    Applies the platform patches first, so it is safe to build megatron models after it.
    """
    from megatron.core import parallel_state, tensor_parallel

    from megatron_longvita.platform import setup_platform

    platform = setup_platform()
    if not dist.is_initialized():
        for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"{var} is not set: launch with torchrun (or set the env:// variables)")
        if platform.name == "cuda":
            torch.cuda.set_device(platform.local_device())
        elif platform.name == "npu":
            torch.npu.set_device(platform.local_device())
        dist.init_process_group(platform.backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    parallel.validate(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    logger.info("rank %d/%d: TP %d PP %d CP %d DP %d", dist.get_rank(), dist.get_world_size(),
                parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                parallel.context_parallel_size, parallel_state.get_data_parallel_world_size())


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
