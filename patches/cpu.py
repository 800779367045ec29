"""CPU (gloo) patch set: megatron-core's CUDA assumptions on the paths we use.

megatron-core 0.16.1 hard-codes CUDA in ~250 places; only the handful below sit on the
paths megatron-longvita runs (model build, forward/backward, pipeline schedules, DDP,
distributed optimizer, grad clipping, dist_checkpointing). Sites that allocate with a
literal ``device="cuda"`` run inside :class:`CudaToCpuMode`, scoped to the patched
function, so no global torch-function hook slows every op and each hit site is named
here. A CUDA call reached outside these sites raises "Torch not compiled with CUDA
enabled", which points at the next site to declare.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .core import Patch, register

MCORE_VERIFIED = ">=0.16.0,<0.17"
TORCH_VERIFIED = ">=2.6"


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a CUDA ordinal


class CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA devices to the CPU for the torch calls made inside a patched function.

    Also answers ``Tensor.type()`` with the CUDA type name, because megatron validates
    parameter and gradient types by comparing against strings like
    ``'torch.cuda.FloatTensor'`` (optimizer/clip_grads.py, optimizer/distrib_optimizer.py).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def on_cpu(original: Callable) -> Callable:
    """Wrap a megatron function so its CUDA allocations land on the CPU."""

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with CudaToCpuMode():
            return original(*args, **kwargs)

    return wrapper


def _cpu_device(_original: Callable) -> Callable[[], torch.device]:
    def current_device() -> torch.device:
        return torch.device("cpu")

    return current_device


def _noop_synchronize(_original: Callable) -> Callable:
    def synchronize(device: Any = None) -> None:
        """CPU kernels are synchronous; there is nothing to wait for."""

    return synchronize


def _cpu_rng_add(_original: Callable) -> Callable:
    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    return add


def _cpu_rng_fork(_original: Callable) -> Callable:
    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)

    return fork


def _declare(name: str, target: str, make: Callable, reason: str, *, distribution: str = "megatron-core") -> None:
    versions = MCORE_VERIFIED if distribution == "megatron-core" else TORCH_VERIFIED
    register(Patch(name, target, make, reason, ("cpu",), versions, distribution))


_declare(
    "cpu-current-device",
    "torch.cuda.current_device",
    _cpu_device,
    "megatron allocates on torch.cuda.current_device() (param buffers, RoPE, optimizer)",
    distribution="torch",
)
_declare(
    "cpu-synchronize",
    "torch.cuda.synchronize",
    _noop_synchronize,
    "p2p_communication and the async checkpoint writer call torch.cuda.synchronize()",
    distribution="torch",
)
_declare(
    "cpu-rng-tracker-add",
    "megatron.core.tensor_parallel.random.CudaRNGStatesTracker.add",
    _cpu_rng_add,
    "the model-parallel RNG tracker seeds CUDA generators",
)
_declare(
    "cpu-rng-tracker-fork",
    "megatron.core.tensor_parallel.random.CudaRNGStatesTracker.fork",
    _cpu_rng_fork,
    "dropout and TP weight init fork the CUDA RNG state even at p=0",
)


def _cpu_get_rng_state(_original: Callable) -> Callable:
    def get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        """The CPU generator stands in for the device one."""
        return torch.get_rng_state()

    return get_rng_state


def _cpu_set_rng_state(_original: Callable) -> Callable:
    def set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    return set_rng_state


_declare(
    "cpu-get-rng-state",
    "megatron.core.tensor_parallel.random._get_cuda_rng_state",
    _cpu_get_rng_state,
    "activation recompute (CheckpointFunction) saves the CUDA RNG state",
)
_declare(
    "cpu-set-rng-state",
    "megatron.core.tensor_parallel.random._set_cuda_rng_state",
    _cpu_set_rng_state,
    "activation recompute restores the CUDA RNG state before re-running the forward",
)


def _cpu_pos_emb_split(_original: Callable) -> Callable:
    def get_pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group: Any) -> torch.Tensor:
        """megatron's rule (CP rank r keeps chunks r and 2CP-1-r of 2CP, the zigzag layout)
        without its pinned host tensor and ``.cuda()``."""
        size, rank = cp_group.size(), cp_group.rank()
        chunks = pos_emb.chunk(2 * size, dim=seq_dim)
        return torch.cat([chunks[rank], chunks[2 * size - 1 - rank]], dim=seq_dim)

    return get_pos_emb_on_this_cp_rank


_declare(
    "cpu-rope-cp-split",
    "megatron.core.models.common.embeddings.rotary_pos_embedding.get_pos_emb_on_this_cp_rank",
    _cpu_pos_emb_split,
    "slices RoPE per CP rank through a pinned host tensor and .cuda()",
)

for _target, _why in (
    (
        "megatron.core.transformer.utils.get_default_causal_mask",
        "builds the causal mask with device='cuda' when no mask is passed",
    ),
    ("megatron.core.optimizer.optimizer.FP32Optimizer.__init__", "allocates its loss-scale tensor with device='cuda'"),
    ("megatron.core.optimizer.clip_grads.get_grad_norm_fp32", "reduces the grad norm in a device='cuda' tensor"),
    (
        "megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32",
        "asserts grads are torch.cuda.FloatTensor and allocates on cuda",
    ),
    ("megatron.core.optimizer.clip_grads.count_zeros_fp32", "counts zeros in a device='cuda' tensor"),
    (
        "megatron.core.optimizer.optimizer.MixedPrecisionOptimizer.__init__",
        "allocates its overflow buffer with device='cuda'",
    ),
    (
        "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.__init__",
        "accepts only torch.cuda.* parameter types when building its shards",
    ),
    (
        "megatron.core.pipeline_parallel.schedules.forward_backward_no_pipelining",
        "counts tokens in a device='cuda' tensor",
    ),
    (
        "megatron.core.pipeline_parallel.schedules.forward_backward_pipelining_without_interleaving",
        "counts tokens in a device='cuda' tensor",
    ),
    (
        "megatron.core.pipeline_parallel.schedules.forward_backward_pipelining_with_interleaving",
        "counts tokens in a device='cuda' tensor",
    ),
):
    _declare(f"cpu-device:{_target.rsplit('.', 2)[-2]}.{_target.rsplit('.', 1)[-1]}", _target, on_cpu, _why)
