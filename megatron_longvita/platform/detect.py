"""Which accelerator we are on, and what follows from it: a pure description, no side effects.

Detection only reads the environment and what is installed; applying the patch set is
``setup_platform``'s job, at the entry points.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

from megatron_longvita.config.platforms import PLATFORM_NAMES as PLATFORMS

PLATFORM_ENV = "LONGVITA_PLATFORM"


@dataclass(frozen=True)
class Platform:
    name: str
    backend: str  # torch.distributed backend
    device_type: str
    attention_kernel: str  # block kernel family for attention / ring attention
    transformer_engine: bool  # build TE layer specs

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cpu") if self.name == "cpu" else torch.device(self.device_type, local_rank)

    def local_device(self) -> torch.device:
        """This process's device under torchrun (LOCAL_RANK), as initialize_distributed sets it."""
        return self.device(int(os.environ.get("LOCAL_RANK", "0")))


def _npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers torch.npu)

    return torch.npu.is_available()


def detect_platform() -> str:
    """`LONGVITA_PLATFORM` if set, else npu, then cuda, then cpu by availability."""
    forced = os.environ.get(PLATFORM_ENV)
    if forced:
        if forced not in PLATFORMS:
            raise ValueError(f"{PLATFORM_ENV}={forced!r}; expected one of {', '.join(PLATFORMS)}")
        return forced
    if _npu_available():
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def describe_platform(name: str) -> Platform:
    """The Platform value for a platform name (what is installed decides TE and the CUDA kernel)."""
    if name not in PLATFORMS:
        raise ValueError(f"unknown platform {name!r}; expected one of {', '.join(PLATFORMS)}")
    if name == "cuda":
        te = importlib.util.find_spec("transformer_engine") is not None
        kernel = "flash_attn" if importlib.util.find_spec("flash_attn") is not None else "sdpa"
        return Platform("cuda", "nccl", "cuda", kernel, te)
    if name == "npu":
        return Platform("npu", "hccl", "npu", "npu_fusion_attention", False)
    return Platform("cpu", "gloo", "cpu", "cpu_flash", False)


@functools.cache
def current_platform() -> Platform:
    """This process's platform, detected once; applies nothing (see ``setup_platform``)."""
    platform = describe_platform(detect_platform())
    if platform.name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{PLATFORM_ENV}=cuda but torch.cuda.is_available() is False")
    return platform
