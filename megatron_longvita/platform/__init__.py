"""Platform layer: which accelerator we are on, and everything that follows from it.

The rest of the package asks this module (never ``torch.cuda`` directly) for the device,
the process-group backend and the attention-kernel family. :func:`setup_platform`
applies the platform's patch set from ``patches/`` exactly once, and must run before any
megatron model is built; :func:`initialize_distributed` calls it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

from megatron_longvita.config.platforms import PLATFORM_NAMES as PLATFORMS

logger = logging.getLogger(__name__)

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


def _describe(name: str) -> Platform:
    if name == "cuda":
        te = importlib.util.find_spec("transformer_engine") is not None
        kernel = "flash_attn" if importlib.util.find_spec("flash_attn") is not None else "sdpa"
        return Platform("cuda", "nccl", "cuda", kernel, te)
    if name == "npu":
        return Platform("npu", "hccl", "npu", "npu_fusion_attention", False)
    return Platform("cpu", "gloo", "cpu", "cpu_flash", False)


@functools.cache
def setup_platform() -> Platform:
    """Detect the platform and apply its patch set (once per process)."""
    platform = _describe(detect_platform())
    if platform.name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{PLATFORM_ENV}=cuda but torch.cuda.is_available() is False")
    from megatron_longvita.patches import apply_platform_patches

    applied = apply_platform_patches(platform.name)
    logger.info("platform %s: backend %s, attention %s, TE %s, %d patch(es) applied",
                platform.name, platform.backend, platform.attention_kernel,
                platform.transformer_engine, len(applied))
    return platform


from megatron_longvita.platform.distributed import destroy_distributed, initialize_distributed  # noqa: E402

__all__ = ["Platform", "detect_platform", "setup_platform", "initialize_distributed", "destroy_distributed"]
