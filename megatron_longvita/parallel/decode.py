"""Decoding against a KV cache sharded over the context-parallel ranks.

Each CP rank holds some of a sequence's cached (already rotated) keys and values. A new
token's query attends to this rank's shard with a ring block kernel, which returns the
log-sum-exp with the output; the partial results are then merged across the CP group by
the same online-softmax rule as the ring (one all-gather of [out, lse] per layer). The
per-token cost is O(N / CP) attention plus one collective of b x heads x (d + 1) floats.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_longvita.parallel.kernels import BlockKernel, Segment
from megatron_longvita.parallel.ring import _merge


def attend_cached(query: Tensor, key: Tensor, value: Tensor, lengths: Sequence[int], kernel: BlockKernel,
                  scale: float) -> tuple[Tensor, Tensor]:
    """One query per row against the first ``lengths[i]`` cached keys of row i.

    query [b, hq, 1, d]; key/value [b, hkv, capacity, d]. Returns (out [b, hq, 1, d] in the
    log-sum-exp dtype, lse [b, hq, 1]); a row with no cached key here has out 0, lse -inf.
    """
    def attend(rows: slice, length: int) -> tuple[Tensor, Tensor]:
        segments = (Segment(0, 1, 0, length),) if length else ()
        out, lse = kernel.forward(query[rows], key[rows], value[rows], segments, False, scale)
        return out.to(lse.dtype), lse

    if len(set(lengths)) == 1:  # the common case (one prompt, or equal lengths): one kernel call
        return attend(slice(None), lengths[0])
    outs, lses = zip(*(attend(slice(i, i + 1), length) for i, length in enumerate(lengths)))
    return torch.cat(outs), torch.cat(lses)


def merge_over_group(out: Tensor, lse: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """Merge every CP rank's partial attention (out [..., d], lse [...]); the result is
    bit-identical on all ranks (same inputs, same rank order), so replicated decode states
    never drift apart. Rank 0 holds position 0, so its lse is finite and starts the fold."""
    if group is None or dist.get_world_size(group) == 1:
        return out
    packed = torch.cat([out, lse.unsqueeze(-1)], dim=-1).contiguous()
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, packed, group=group)
    out, lse = parts[0][..., :-1], parts[0][..., -1]
    for part in parts[1:]:
        out, lse = _merge(out, lse, part[..., :-1], part[..., -1])
    return out
