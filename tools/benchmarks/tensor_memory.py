"""Exact tensor memory of a step: the high-water mark of live tensor storages it allocates.

:class:`LiveTensorBytes` is a TorchDispatchMode: every op's output storage that did not exist
before is counted until it is freed, independent of the allocator (caching, RSS). Storages
created inside a kernel that never reach Python (per-thread scratch of a fused kernel) are not
seen. With ``where=True`` each storage is labelled with the op that made it, its shape, and the
innermost call site outside torch, and the live set is kept at the peak (:meth:`at_peak`), so
a benchmark can print what each buffer holds at the high-water mark.
"""

from __future__ import annotations

import sys
import weakref
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_TORCH_DIR = str(Path(torch.__file__).parent)
MIB = 2**20


def _call_site() -> str:
    """file:line function of the innermost frame outside torch (and this module)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_TORCH_DIR) and name != __file__ and "/contextlib.py" not in name:
            return f"{Path(name).name}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while the mode is active and still alive.

    ``inputs`` existed before: views of them (a weight's transpose) allocate nothing.
    ``phase`` (settable at any time) names the part of the step now running; ``phase_peaks``
    holds the high-water mark reached during each phase.
    """

    def __init__(self, inputs: Iterable[torch.Tensor] = (), where: bool = False) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.phase = "step"
        self.phase_peaks: dict[str, int] = {}
        self._where = where
        self._labels: dict[int, tuple[str, int]] = {}  # storage id -> (label, bytes), with ``where``
        self._at_peak: list[tuple[str, int]] = []
        self._seen: set[int] = {id(tensor.untyped_storage()) for tensor in inputs}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor, func)
        return out

    def _track(self, tensor: torch.Tensor, func) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)  # storages keep their Python object while alive, so id() is stable
        if key in self._seen:  # views and in-place results share a storage
            return
        self._seen.add(key)
        nbytes = storage.nbytes()
        self.live += nbytes
        if self._where:
            label = f"{func.__name__} {tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')} @ {_call_site()}"
            self._labels[key] = (label, nbytes)
        if self.live > self.peak:
            self.peak = self.live
            if self._where:
                self._at_peak = list(self._labels.values())
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self._labels.pop(key, None)
        self.live -= nbytes

    def at_peak(self, top: Optional[int] = None, min_bytes: int = 0) -> list[dict]:
        """The storages live at the peak, grouped by label, largest first (needs ``where=True``)."""
        totals, counts = Counter(), Counter()
        for label, nbytes in self._at_peak:
            totals[label] += nbytes
            counts[label] += 1
        rows = [{"mib": round(nbytes / MIB, 3), "count": counts[label], "what": label}
                for label, nbytes in totals.most_common(top) if nbytes >= min_bytes]
        return rows
