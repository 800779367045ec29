"""One call from Megatron-style arguments to torch.distributed + megatron parallel_state."""

from __future__ import annotations

import datetime
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist

from megatron_longvita.config.parallel import ParallelConfig
from megatron_longvita.patches import is_applied
from megatron_longvita.platform.detect import Platform, current_platform

logger = logging.getLogger(__name__)


def _require_patches(platform: Platform) -> None:
    """Fail fast, before megatron reaches CUDA-only code, when no entry point applied the patches."""
    if not is_applied(platform.name):
        raise RuntimeError(
            f"platform {platform.name}: its patch set is not applied; call "
            "megatron_longvita.platform.setup_platform() once at the entry point, before "
            "initialize_distributed"
        )


def initialize_distributed(
    parallel: ParallelConfig, seed: int = 1234, timeout_minutes: int = 30, *, platform: Optional[Platform] = None
) -> None:
    """Initialise the default process group (torchrun env vars) and megatron's groups.

    ``platform``: default the detected one. Its patch set must already be applied
    (``setup_platform``, at the entry point); this checks, and applies nothing.
    """
    from megatron.core import parallel_state, tensor_parallel

    platform = platform or current_platform()
    _require_patches(platform)
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
    logger.info(
        "rank %d/%d: TP %d PP %d CP %d DP %d",
        dist.get_rank(),
        dist.get_world_size(),
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel.context_parallel_size,
        parallel_state.get_data_parallel_world_size(),
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
