"""Decoding against a KV cache sharded over the context-parallel ranks.

Each CP rank holds some of a sequence's cached (already rotated) keys and values. A new
token's query attends to this rank's shard, which yields the log-sum-exp with the output;
the partial results are then merged across the CP group by the same online-softmax rule
as the ring (one all-gather of [out, lse] per layer). The per-token cost is O(N / CP)
attention plus one collective of b x heads x (d + 1) floats.

One query row is a matrix-vector product, so it is computed as two grouped matmuls (GQA
without repeating K/V) rather than through a ring block kernel: ATen's CPU flash kernel,
made for query blocks, took 2.7-10x longer on one row (4K-64K keys, fp32, one thread).
Scores and softmax are float32, as in the flash kernels; for a bf16/fp16 cache that means a
float32 copy of the attended K/V per step, which a fused flash-decoding kernel would avoid
on accelerators (not measured: no GPU/NPU run yet).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_longvita.parallel.kernels import lse_dtype, merge_partial_attention


def attend_cached(
    query: Tensor, key: Tensor, value: Tensor, lengths: Sequence[int], scale: float
) -> tuple[Tensor, Tensor]:
    """One query per row against the first ``lengths[i]`` cached keys of row i.

    query [b, hq, 1, d]; key/value [b, hkv, capacity, d]. Returns (out [b, hq, 1, d], lse
    [b, hq, 1]), both in the log-sum-exp dtype (float32, float64 for float64 inputs); a row
    with no cached key here has out 0 and lse -inf, which the merge ignores.
    """
    dtype, longest, shortest = lse_dtype(query.dtype), max(lengths), min(lengths)
    batch, query_heads, _, dim = query.shape
    keys, values = key[:, :, :longest], value[:, :, :longest]
    grouped_query = query.reshape(batch, key.shape[1], query_heads // key.shape[1], dim).to(dtype) * scale
    scores = torch.matmul(grouped_query, keys.transpose(-1, -2).to(dtype))  # [b, hkv, g, longest]
    if shortest < longest:  # rows of a batch hold different numbers of slots on this rank
        valid = torch.arange(longest, device=query.device) < torch.tensor(lengths, device=query.device)[:, None]
        scores = scores.masked_fill(~valid[:, None, None, :], -math.inf)
        values = values.masked_fill(~valid[:, None, :, None], 0.0)  # unwritten slots may hold NaN: 0 * NaN
    # softmax in place (one pass fewer and no [.., longest] temporaries beside the scores, which
    # is what a step costs beyond reading K/V at long context); normalised after the PV product
    peak = scores.amax(-1, keepdim=True)
    if shortest == 0:  # a row with no slot: shift by 0, so its weights are 0 rather than NaN
        peak = peak.masked_fill(peak == -math.inf, 0.0)
    weights = scores.sub_(peak).exp_()
    total = weights.sum(-1, keepdim=True)  # >= 1 where a slot exists (its peak weighs exp(0)), else 0
    out = torch.matmul(weights, values.to(dtype)).div_(total.clamp_min(1.0))
    lse = peak + total.log()
    return out.view(batch, query_heads, 1, dim), lse.view(batch, query_heads, 1)


@functools.cache
def _polling_pays() -> bool:
    """Whether to wait for gloo collectives by polling rather than sleeping.

    gloo's blocking wait parks the thread, and waking it again cost 0.5-1 ms per all-gather
    on a 2-core CPU host (0.98 ms after an idle millisecond vs 0.24 ms back to back), as
    much as a whole decode step of a small model: polling took CP=2 decoding there from
    3.9 to 2.9 ms/token. A polling rank keeps its core, so it pays only while this host's
    ranks have a core per thread (CP=4 on 2 cores went from 9.5 to 11.3 ms/token).
    """
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return ranks_here * torch.get_num_threads() <= len(os.sched_getaffinity(0))


def wait_collective(work: dist.Work, group: dist.ProcessGroup) -> None:
    """Wait for an async collective, polling where that pays (see _polling_pays)."""
    if dist.get_backend(group) == dist.Backend.GLOO and _polling_pays():
        while not work.is_completed():
            os.sched_yield()  # hands the core to a gloo thread or rank that has work
    work.wait()  # raises the collective's error, if any


def merge_over_group(out: Tensor, lse: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """Merge every CP rank's partial attention (out [..., d], lse [...]); the result is
    bit-identical on all ranks (same inputs, same rank order), so replicated decode states
    never drift apart. Rank 0 holds position 0, so its lse is finite and starts the fold."""
    if group is None or dist.get_world_size(group) == 1:
        return out
    packed = torch.cat([out, lse.unsqueeze(-1)], dim=-1).contiguous()
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    wait_collective(dist.all_gather(parts, packed, group=group, async_op=True), group)
    out, lse = parts[0][..., :-1], parts[0][..., -1]
    for part in parts[1:]:
        out, lse = merge_partial_attention(out, lse, part[..., :-1], part[..., -1])
    return out
