"""The single registry of monkey patches applied to third-party code.

Every patch is a declared unit: the dotted target it replaces, a factory that builds the
replacement from the original, a one-line reason, the platforms it applies to and the
version range of the patched distribution it was verified against. Nothing else in
megatron-longvita monkey-patches anything. Private upstream API that we override or mirror
without patching it is declared alongside, as upstream contracts (:mod:`.contracts`).

Installed as ``megatron_longvita.patches`` (see setup.py); ``python -m
megatron_longvita.patches`` lists the patches and contracts in force on this platform.
Patches are applied once per process, by the entry points (``platform.setup_platform``).
"""

from __future__ import annotations

from . import cpu, npu  # noqa: F401  (importing a patch set declares its patches)
from .core import (
    _APPLIED,
    PLATFORMS,
    AppliedPatch,
    Patch,
    PatchTargetError,
    PatchVersionError,
    applied,
    apply,
    check_version,
    declared,
    installed_version,
    register,
)

__all__ = [
    "PLATFORMS",
    "AppliedPatch",
    "Patch",
    "PatchTargetError",
    "PatchVersionError",
    "apply",
    "applied",
    "apply_platform_patches",
    "check_version",
    "declared",
    "installed_version",
    "is_applied",
    "register",
]

_applied_platforms: set[str] = set()


def is_applied(platform: str) -> bool:
    """Whether this process applied `platform`'s patch set (an entry point's setup_platform did)."""
    return platform in _applied_platforms


def apply_platform_patches(platform: str) -> list[AppliedPatch]:
    """Apply every patch declared for `platform` (idempotent)."""
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; known: {', '.join(PLATFORMS)}")
    patches = declared(platform)
    for patch in patches:  # fail fast on versions before touching anything
        check_version(patch)
    if platform == "npu":
        # Always routed: importing MindSpeed's adaptor is what adapts megatron to torch_npu.
        pending = [patch for patch in patches if patch.name not in _APPLIED]
        for record in npu.apply_through_mindspeed(pending):
            _APPLIED[record.patch.name] = record
        records = [_APPLIED[patch.name] for patch in patches]
    else:
        records = [apply(patch) for patch in patches]
    _applied_platforms.add(platform)
    return records
