"""The patch machinery: a declared unit per patch, version and target checks, idempotent apply.

The patch sets (``cpu``, ``npu``) declare their patches through :func:`register`; the
package (``__init__``) imports them and applies a platform's set.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from megatron_longvita.config.platforms import PLATFORM_NAMES as PLATFORMS

logger = logging.getLogger(__name__)


class PatchVersionError(RuntimeError):
    """The installed version of a patched distribution is outside the verified range."""


class PatchTargetError(RuntimeError):
    """A patch target does not exist (the upstream code moved or was renamed)."""


@dataclass(frozen=True)
class Patch:
    name: str
    target: str  # dotted path: "package.module.attr" or "package.module.Class.method"
    make_replacement: Callable[[Any], Any]  # original -> replacement
    reason: str
    platforms: tuple[str, ...]
    versions: str  # PEP 440 specifier of `distribution` this patch was verified against
    distribution: str = "megatron-core"

    def __post_init__(self) -> None:
        unknown = set(self.platforms) - set(PLATFORMS)
        if unknown:
            raise ValueError(f"patch {self.name!r}: unknown platforms {sorted(unknown)}")


@dataclass
class AppliedPatch:
    patch: Patch
    original: Any
    replacement: Any
    rebound_in: list[str] = field(default_factory=list)  # modules whose `from x import f` copy was rebound


_REGISTRY: dict[str, Patch] = {}
_APPLIED: dict[str, AppliedPatch] = {}


def register(patch: Patch) -> Patch:
    if patch.name in _REGISTRY and _REGISTRY[patch.name] != patch:
        raise ValueError(f"patch {patch.name!r} is declared twice")
    _REGISTRY[patch.name] = patch
    return patch


def declared(platform: str) -> list[Patch]:
    """Patches declared for `platform`, in declaration order."""
    return [p for p in _REGISTRY.values() if platform in p.platforms]


def applied() -> list[AppliedPatch]:
    return list(_APPLIED.values())


def installed_version(distribution: str) -> Version | None:
    try:
        return Version(metadata.version(distribution))
    except metadata.PackageNotFoundError:
        return None


def check_version(patch: Patch) -> None:
    version = installed_version(patch.distribution)
    if version is None or version not in SpecifierSet(patch.versions):
        raise PatchVersionError(
            f"patch {patch.name!r} targets {patch.distribution}{patch.versions} but "
            f"{patch.distribution} {version or 'is not installed'} is; re-verify the patch "
            f"({patch.target}: {patch.reason}) and widen its version range"
        )


def _resolve(target: str) -> tuple[Any, str]:
    """Import the longest importable module prefix of `target`; return (owner, attribute)."""
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            owner: Any = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[split:-1]:
                owner = getattr(owner, attr)
            getattr(owner, parts[-1])
        except AttributeError as error:
            raise PatchTargetError(f"patch target {target!r} not found: {error}") from None
        return owner, parts[-1]
    raise PatchTargetError(f"patch target {target!r}: no importable module prefix")


def apply(patch: Patch) -> AppliedPatch:
    """Apply one patch; applying it again is a no-op."""
    if patch.name in _APPLIED:
        return _APPLIED[patch.name]
    check_version(patch)
    owner, attr = _resolve(patch.target)
    original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
    replacement = patch.make_replacement(original)
    setattr(owner, attr, replacement)
    record = AppliedPatch(patch, original, replacement)
    if not isinstance(owner, type):
        # `from module import function` made copies; rebind the ones already imported.
        package = patch.target.split(".")[0]
        for name, module in list(sys.modules.items()):
            if module is None or module is owner or not name.startswith(package):
                continue
            if getattr(module, attr, None) is original:
                setattr(module, attr, replacement)
                record.rebound_in.append(name)
    _APPLIED[patch.name] = record
    logger.debug("applied patch %s -> %s", patch.name, patch.target)
    return record
