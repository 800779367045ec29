"""Checkpoints through megatron dist_checkpointing (torch_dist).

Model weights save at one layout and load at any other (TP/PP/VPP). A training checkpoint
adds the optimizer (``dp_reshardable``: fully parallel, exact for the same TP/PP layout),
the LR scheduler, every rank's RNG state, the data-iterator state and the iteration.

Atomicity: a checkpoint is written to ``iter_NNNNNNN.tmp`` and renamed once every rank has
finished; only then is ``latest_checkpointed_iteration.txt`` replaced (write + os.replace).
A process killed mid-save leaves the previous checkpoint complete and marked latest.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.transformer import MegatronModule

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


def _unwrap(chunk: torch.nn.Module) -> MegatronModule:
    return getattr(chunk, "module", chunk)  # megatron DDP wraps the model in .module


def _model_keys(chunks: list[torch.nn.Module]) -> list[str]:
    # Megatron-LM's convention: "model" without interleaving, "model0".."modelN" with it.
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def sharded_model_state(chunks: list[torch.nn.Module]) -> dict:
    return {key: _unwrap(chunk).sharded_state_dict() for key, chunk in zip(_model_keys(chunks), chunks)}


def _load_model_state(chunks: list[torch.nn.Module], state: dict) -> None:
    for key, chunk in zip(_model_keys(chunks), chunks):
        _unwrap(chunk).load_state_dict(state[key])


def save_model(chunks: list[torch.nn.Module], checkpoint_dir: str) -> None:
    """Weights only. Collective: every rank of the job calls it with its own chunks."""
    if dist.get_rank() == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(sharded_model_state(chunks), checkpoint_dir)


class CheckpointMismatch(ValueError):
    """The checkpoint's tensors and the model's differ; names them."""


def _model_tensor_mismatch(
    parts: tuple[str, ...], not_loaded: set[str], not_found: set[str], checkpoint_dir: str, allow_unused: bool
) -> None:
    """Every model tensor must come from the checkpoint; every checkpoint tensor of the model's parts
    must be loaded (a projector bias or an extra layer would otherwise vanish without a word). TE's
    `_extra_state` (FP8 metadata, not weights) and other sections (optimizer, RNG) are not model tensors."""
    unused = sorted(key for key in not_loaded if key.startswith(parts) and not key.endswith("_extra_state"))
    absent = sorted(key for key in not_found if not key.endswith("_extra_state"))
    if absent:
        raise CheckpointMismatch(f"{checkpoint_dir} lacks {len(absent)} tensor(s) the model has: {', '.join(absent)}")
    if unused and not allow_unused:
        raise CheckpointMismatch(
            f"{checkpoint_dir} has {len(unused)} tensor(s) the model does not use: "
            f"{', '.join(unused)} (the model config disagrees with the weights; "
            "train --allow-unused-tensors loads anyway and logs each)"
        )
    for key in unused:
        logger.warning("%s: tensor %s is not used by this model (--allow-unused-tensors)", checkpoint_dir, key)


def _sharded_keys(state: Any) -> list[str]:
    if isinstance(state, dict):
        return [key for value in state.values() for key in _sharded_keys(value)]
    if isinstance(state, (list, tuple)):
        return [key for value in state for key in _sharded_keys(value)]
    return [state.key] if hasattr(state, "key") else []


def load_model(chunks: list[torch.nn.Module], checkpoint_dir: str, allow_unused: bool = False) -> None:
    """Collective: loads whatever layout the checkpoint was saved at into these chunks, refusing a
    checkpoint whose model tensors differ from the chunks' (see `_model_tensor_mismatch`)."""
    requested = sharded_model_state(chunks)
    # the model's parts over all ranks (a pipeline stage holds only some), e.g. "vision."
    local_parts = {key.split(".", 1)[0] + "." for key in _sharded_keys(requested)}
    every_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, local_parts)
    parts = tuple(sorted(set().union(*every_rank)))
    state, not_loaded, not_found = dist_checkpointing.load(requested, checkpoint_dir, strict=StrictHandling.RETURN_ALL)
    _model_tensor_mismatch(parts, set(not_loaded), set(not_found), checkpoint_dir, allow_unused)
    _load_model_state(chunks, state)


def _per_rank(key: str, value: Any) -> ShardedObject:
    """An object every rank saves for itself (RNG, data iterator): restored at the same world size."""
    return ShardedObject(key, value, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def latest_iteration(save_dir: str) -> Optional[int]:
    tracker = os.path.join(save_dir, TRACKER)
    if not os.path.exists(tracker):
        return None
    with open(tracker) as handle:
        return int(handle.read().strip())


def latest_checkpoint_dir(save_dir: str) -> Optional[str]:
    """The directory the tracker marks latest, or None before the first complete save."""
    iteration = latest_iteration(save_dir)
    return None if iteration is None else iteration_dir(save_dir, iteration)


@dataclass
class ResumePoint:
    """Where a restored training checkpoint resumes: what it holds besides weights and optimizer."""

    iteration: int
    scheduler: Optional[dict]
    data: Optional[dict]  # this rank's data-iterator state


def save_training_checkpoint(
    save_dir: str,
    iteration: int,
    chunks: list[torch.nn.Module],
    optimizer,
    scheduler,
    data_state: Optional[dict],
    write_extra: Optional[Callable[[str], None]] = None,
) -> str:
    """Collective. Returns the final checkpoint directory. ``write_extra(directory)`` runs on rank 0
    before the rename, so side files (e.g. the model config) are part of the atomic checkpoint."""
    final = iteration_dir(save_dir, iteration)
    staging = final + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # debris of a save that was killed
        os.makedirs(staging)
    dist.barrier()
    model_state = sharded_model_state(chunks)
    state = {
        **model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, is_loading=False, metadata=OPTIMIZER_SHARDING),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "iteration": iteration,
        "rng": _per_rank("rng", _rng_state()),
        "data": _per_rank("data", data_state),
    }
    dist_checkpointing.save(state, staging, content_metadata=OPTIMIZER_SHARDING)
    dist.barrier()
    if dist.get_rank() == 0:
        if write_extra is not None:
            write_extra(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        tracker = os.path.join(save_dir, TRACKER)
        with open(tracker + ".tmp", "w") as handle:
            handle.write(str(iteration))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tracker + ".tmp", tracker)
        logger.info("saved checkpoint %s", final)
    dist.barrier()
    return final


def _allocate_optimizer_state(optimizer) -> None:
    """Create Adam's per-parameter state before a load: megatron builds the load request from
    ``DistributedOptimizer.state_dict()``, which reads each state's ``step`` (torch only creates
    it at the first step). The values are placeholders that the load overwrites, step included."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if inner.optimizer is None or inner.optimizer.state or inner.init_state_fn is None:
            continue
        inner.init_state_fn(inner.optimizer, inner.config)
        for param_state in inner.optimizer.state.values():
            param_state.setdefault("step", torch.tensor(0.0))


def _restore_adam_steps(optimizer, optimizer_state: dict) -> None:
    """Give every Adam state its own copy of the saved step.

    With the distributed optimizer, the per-bucket parameter state is copied over the step
    that ``load_state_dict`` had just restored from the saved param groups, with our
    placeholder (0); and the restored step is one tensor shared by all parameters, which
    torch's Adam would advance once per parameter per iteration. Either way the bias
    correction drifts from the second resumed step on (measured: loss off by 4e-2).
    """
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [optimizer_state] if len(inners) == 1 else [optimizer_state[i] for i in range(len(inners))]
    for inner, state in zip(inners, states):
        if inner.optimizer is None or "optimizer" not in state:
            continue  # a non-distributed optimizer restores its own per-parameter steps
        steps = {group["step"] for group in state["optimizer"]["param_groups"] if "step" in group}
        if len(steps) != 1:
            raise RuntimeError(f"checkpoint holds {len(steps)} distinct Adam steps {sorted(steps)}; expected one")
        step = steps.pop()
        for param_state in inner.optimizer.state.values():
            param_state["step"] = torch.tensor(float(step))


def load_training_checkpoint(
    save_dir: str, chunks: list[torch.nn.Module], optimizer, scheduler, iteration: Optional[int] = None
) -> Optional[ResumePoint]:
    """Collective. Restores the latest (or given) checkpoint; None when there is none."""
    iteration = latest_iteration(save_dir) if iteration is None else iteration
    if iteration is None:
        return None
    directory = iteration_dir(save_dir, iteration)
    _allocate_optimizer_state(optimizer)
    model_state = sharded_model_state(chunks)
    request = {
        **model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, is_loading=True, metadata=OPTIMIZER_SHARDING),
        "rng": _per_rank("rng", None),
        "data": _per_rank("data", None),
    }
    state = dist_checkpointing.load(request, directory)
    _load_model_state(chunks, state)
    with torch.no_grad():  # the distributed optimizer copies into views of its fp32 main params
        optimizer.load_state_dict(state["optimizer"])
    _restore_adam_steps(optimizer, state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    logger.info("resumed from %s", directory)
    return ResumePoint(state["iteration"], state.get("scheduler"), state["data"])
