"""Platform layer: which accelerator we are on, and everything that follows from it.

The rest of the package asks this layer (never ``torch.cuda`` directly) for the device, the
process-group backend and the attention-kernel family, as a :class:`Platform` value passed
into builders (``build_long_vita(..., platform=...)``), the way megatron passes its config
and process groups. Detection (:func:`current_platform`) is pure. :func:`setup_platform`
detects and applies the platform's patch set from ``patches/`` once per process; only entry
points call it (train, generate, the checkpoint converter, the smoke job, the tools, the
test harness), before any megatron model is built.
"""

from __future__ import annotations

import functools
import logging

from megatron_longvita.patches import apply_platform_patches
from megatron_longvita.patches.contracts import check_contracts
from megatron_longvita.platform.detect import (
    PLATFORM_ENV,
    PLATFORMS,
    Platform,
    current_platform,
    describe_platform,
    detect_platform,
)
from megatron_longvita.platform.distributed import destroy_distributed, initialize_distributed

logger = logging.getLogger(__name__)


@functools.cache
def setup_platform() -> Platform:
    """Entry points only: detect the platform, check the upstream contracts and apply the
    platform's patch set (once per process). Returns the Platform to pass on."""
    platform = current_platform()
    check_contracts()
    applied = apply_platform_patches(platform.name)
    logger.info(
        "platform %s: backend %s, attention %s, TE %s, %d patch(es) applied",
        platform.name,
        platform.backend,
        platform.attention_kernel,
        platform.transformer_engine,
        len(applied),
    )
    return platform


__all__ = [
    "PLATFORM_ENV",
    "PLATFORMS",
    "Platform",
    "current_platform",
    "describe_platform",
    "detect_platform",
    "setup_platform",
    "initialize_distributed",
    "destroy_distributed",
]
