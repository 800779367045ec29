"""Named builders that make megatron-longvita a plugin.

A registry is a dict, a decorator and a lookup with a good error. Configs name their
choices (model preset and provider, packing layout, bin packer, record format, attention
block kernel, layer spec, output head) by these names, and validation looks the names up
here, so whatever a plugin registers is accepted like a built-in. Third-party packages
register through the ``megatron_longvita.plugins`` entry-point group: each entry point
names a module that is imported once, and its decorators do the registering.

The registries a config names live in this module (the lowest layer, so the config layer
can validate against them); each names the module holding its built-ins, imported on the
first lookup, and the built-ins register there with the decorator.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any, Generic, Optional, TypeVar

T = TypeVar("T")

ENTRY_POINT_GROUP = "megatron_longvita.plugins"


class UnknownNameError(KeyError):
    """Raised when a config names something no one registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str, builtins: Optional[str] = None) -> None:
        self.kind = kind
        self.builtins = builtins  # module registering the built-in members, imported on first lookup
        self._items: dict[str, T] = {}

    def _load(self) -> None:
        if self.builtins is not None:
            importlib.import_module(self.builtins)
        load_plugins()

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise ValueError(f"{self.kind} {name!r} is already registered to {self._items[name]!r}")
            self._items[name] = item
            return item

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            self._load()
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; registered: {known}") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        if name not in self._items:
            self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


_plugins_loaded = False


def load_plugins() -> None:
    """Import every module advertised under the plugin entry-point group (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        entry_point.load()


# How a packed row is laid out for attention: (sample lengths, seq_length) -> (position ids,
# cu_seqlens or None). Config: data.packing.
PACKING_LAYOUTS: Registry[Callable[..., Any]] = Registry("packing layout", "megatron_longvita.data.packing")
# Which samples share a row: (sample lengths, capacity) -> rows of sample indices. Config: data.bin_packer.
BIN_PACKERS: Registry[Callable[..., Any]] = Registry("bin packer", "megatron_longvita.data.packing")
# Output head classes (models/heads.py OutputHead), built with the chunk size. Config: model.lm_head.
OUTPUT_HEADS: Registry[type] = Registry("output head", "megatron_longvita.models.heads")
