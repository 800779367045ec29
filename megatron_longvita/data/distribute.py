"""One loader per model replica's tensor x context parallel group, broadcasting to the rest.

Every TP and CP rank of a data-parallel replica consumes the same micro-batches (CP ranks
then cut out their zigzag share). Megatron-LM loads them on TP rank 0 and broadcasts; here
the first rank of the TP x CP group runs the loader (reading, decoding and tiling the media
once instead of TP x CP times) and broadcasts each micro-batch: a header (keys, tensor
shapes and dtypes, the plain values such as ``stats``) as one pickled object, then each
tensor, straight into the platform's device memory. Pipeline stages keep a loader each
(every stage needs positions and document boundaries).

All ranks of the group draw micro-batches in lockstep (the same schedule runs on each), so
every broadcast has its partners; an exhausted source sends an end marker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

_END = None  # header of the end marker


def _header(batch: dict[str, Any]) -> dict[str, tuple]:
    return {
        key: ("tensor", tuple(value.shape), value.dtype) if isinstance(value, Tensor) else ("value", value)
        for key, value in batch.items()
    }


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors moved and made contiguous (a collective sends a tensor's storage as laid out)."""
    return {
        key: value.to(device, non_blocking=True).contiguous() if isinstance(value, Tensor) else value
        for key, value in batch.items()
    }


class BroadcastLoader:
    """The loader interface (iteration, ``state_dict``, ``load_state_dict``) on every rank of
    ``group``; ``build_loader`` runs on the group's first rank only. Batches come out on
    ``device``. The data state lives on the source rank (None elsewhere)."""

    def __init__(self, build_loader: Callable[[], Any], group: dist.ProcessGroup, device: torch.device) -> None:
        self.group, self.device = group, device
        self.size, self.source = dist.get_world_size(group), dist.get_global_rank(group, 0)
        self.loader = build_loader() if dist.get_rank() == self.source else None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._send() if self.loader is not None else self._receive()

    def _broadcast_header(self, header: Optional[dict]) -> Optional[dict]:
        holder = [header]
        dist.broadcast_object_list(holder, src=self.source, group=self.group, device=self.device)
        return holder[0]

    def _send(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            batch = batch_to_device(batch, self.device)
            if self.size > 1:
                self._broadcast_header(_header(batch))
                for value in batch.values():
                    if isinstance(value, Tensor):
                        dist.broadcast(value, src=self.source, group=self.group)
            yield batch
        if self.size > 1:
            self._broadcast_header(_END)

    def _receive(self) -> Iterator[dict[str, Any]]:
        while (header := self._broadcast_header(None)) is not _END:
            batch = {}
            for key, (kind, *spec) in header.items():
                if kind == "value":
                    batch[key] = spec[0]
                    continue
                shape, dtype = spec
                batch[key] = torch.empty(shape, dtype=dtype, device=self.device)
                dist.broadcast(batch[key], src=self.source, group=self.group)
            yield batch

    def state_dict(self) -> Optional[dict]:
        return self.loader.state_dict() if self.loader is not None else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.loader is not None:
            self.loader.load_state_dict(state)
