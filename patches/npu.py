"""NPU patch set, routed through MindSpeed's own patch manager.

On Ascend, MindSpeed already adapts megatron-core to torch_npu (``mindspeed.megatron_adaptor``
patches devices, fused kernels and the RNG tracker). Our NPU patches, declared with
``platforms=("npu",)``, are registered with ``MindSpeedPatchesManager`` so that MindSpeed
applies them in its own order on top of its patches, and ``python -m
megatron_longvita.patches`` still lists them. MindSpeed and torch_npu are imported here
lazily: they exist only on NPU machines and are installed from the vendor's channel.
"""

from __future__ import annotations

import importlib

from .core import AppliedPatch, Patch, _resolve


def apply_through_mindspeed(patches: list[Patch]) -> list[AppliedPatch]:
    try:
        importlib.import_module("torch_npu")
        importlib.import_module("mindspeed.megatron_adaptor")  # MindSpeed's patches to megatron
        manager = importlib.import_module("mindspeed.patch_utils").MindSpeedPatchesManager
    except ImportError as error:
        raise RuntimeError(
            "platform 'npu' needs torch_npu and MindSpeed from Ascend's channels (see README, "
            f"'Version matrix'); import failed: {error}"
        ) from error
    records = []
    for patch in patches:
        owner, attr = _resolve(patch.target)
        original = getattr(owner, attr)
        replacement = patch.make_replacement(original)
        manager.register_patch(patch.target, replacement, force_patch=True)
        records.append(AppliedPatch(patch, original, replacement))
    manager.apply_patches()
    return records
