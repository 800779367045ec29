"""The KV cache of cached ring attention (inference): per layer, this rank's keys and values, preallocated.

Keys are stored as core attention receives them, i.e. already rotated by RoPE, so decoding
never re-rotates the past. Under context parallelism a rank caches its zigzag share of the
prompt (its local order is ascending in position, so a row's real tokens are a prefix of
its slots) plus the generated tokens appended to it; under TP only its heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LayerKV:
    key: Tensor  # [b, hkv_local, capacity, d], rotated
    value: Tensor  # [b, hkv_local, capacity, d]


@dataclass
class KVCache:
    """Shared by the cached attention modules of one model while a request runs.

    ``lengths[i]``: the valid slots of row i on this rank (the same for every layer).
    Prefill (``decoding`` False) allocates and fills the layers; each decode step reads the
    first ``lengths`` slots, plus the new token's own slot where ``appending``.
    """

    capacity: int
    lengths: list[int]
    decoding: bool = False
    appending: bool = False
    layers: dict[int, LayerKV] = field(default_factory=dict)

    def store_prefill(self, layer: int, key: Tensor, value: Tensor) -> None:
        """Keep this rank's prompt K/V [s_local, b, hkv, d] in the first s_local slots."""
        local_length, batch, heads, dim = key.shape
        if local_length > self.capacity:
            raise ValueError(f"prefill of {local_length} local tokens exceeds the cache capacity {self.capacity}")
        shape = (batch, heads, self.capacity, dim)
        kv = LayerKV(key.new_empty(shape), value.new_empty(shape))
        kv.key[:, :, :local_length] = key.permute(1, 2, 0, 3)
        kv.value[:, :, :local_length] = value.permute(1, 2, 0, 3)
        self.layers[layer] = kv

    def append(self, layer: int, key: Tensor, value: Tensor) -> None:
        """Store the new token's K/V [1, b, hkv, d] at each row's next free slot."""
        if max(self.lengths) >= self.capacity:
            raise ValueError(f"KV cache full ({self.capacity} slots): allocate for max_new_tokens")
        kv = self.layers[layer]
        if len(set(self.lengths)) == 1:  # one prompt, or rows level here: a plain slice copy
            kv.key[:, :, self.lengths[0]] = key[0]
            kv.value[:, :, self.lengths[0]] = value[0]
            return
        rows, slots = torch.arange(key.shape[1], device=key.device), torch.tensor(self.lengths, device=key.device)
        kv.key[rows, :, slots] = key[0]
        kv.value[rows, :, slots] = value[0]

    def attended_lengths(self) -> list[int]:
        return [n + int(self.appending) for n in self.lengths]

    def finish_step(self) -> None:
        self.lengths = self.attended_lengths()

    def nbytes(self) -> int:
        return sum(kv.key.nbytes + kv.value.nbytes for kv in self.layers.values())
