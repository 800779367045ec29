"""Causal ring attention over the context-parallel group, on the zigzag layout.

Each rank keeps its query block; key/value blocks travel around the ring (rank r sends to
r+1 and receives from r-1) with batched isend/irecv into a second buffer while the current
block is being attended to. Partial outputs are merged through their log-sum-exp. The
backward recomputes block gradients against the final output and log-sum-exp; dK/dV
accumulators travel with their key/value block and arrive home after a full turn.

Zigzag makes every step the same amount of work (rank r, block of rank s, c = chunk):
  s == r: all 2c queries x all 2c keys, causal (local order is global order)
  s <  r: all 2c queries x the first c keys (chunk s); chunk 2CP-1-s is in the future
  s >  r: the last c queries (chunk 2CP-1-r) x all 2c keys; chunk r sees neither
Packed documents (reset mode) narrow each step to one segment per document present on
both sides, so masking costs nothing and a query whose document is absent gets lse=-inf.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron_longvita.parallel.kernels import BLOCK_KERNELS, BlockKernel, Segment, merge_partial_attention
from megatron_longvita.parallel.zigzag import ContextParallelLayoutError, zigzag_positions

_KV_TAG, _DKV_TAG = 0, 1


@dataclass(frozen=True)
class RingStep:
    source: int  # CP rank whose key/value block this step attends to
    causal: bool
    segments: tuple[Segment, ...]


def _document_runs(documents: Tensor, start: int, stop: int) -> dict[int, tuple[int, int]]:
    """document id -> [first, last + 1) local row; documents are contiguous (sorted ids)."""
    ids, counts = torch.unique_consecutive(documents[start:stop], return_counts=True)
    ends = (start + counts.cumsum(0)).tolist()
    return {doc: (end - count, end) for doc, count, end in zip(ids.tolist(), counts.tolist(), ends)}


def _document_segments(rows: tuple[int, int], cols: tuple[int, int], q_documents: Tensor,
                       k_documents: Tensor) -> tuple[Segment, ...]:
    """One segment per document present among both the query rows and the key columns."""
    q_runs, k_runs = _document_runs(q_documents, *rows), _document_runs(k_documents, *cols)
    return tuple(Segment(*q_runs[doc], *k_runs[doc]) for doc in q_runs if doc in k_runs)


def _document_ids(cu_seqlens: tuple[int, ...], total_length: int, cp_size: int) -> list[Tensor]:
    """Per CP rank, the document index of each local token (padding past the end is its own)."""
    decreasing = any(b < a for a, b in zip(cu_seqlens, cu_seqlens[1:]))
    if not cu_seqlens or cu_seqlens[0] != 0 or decreasing or cu_seqlens[-1] > total_length:
        raise ContextParallelLayoutError(
            f"cu_seqlens must start at 0, not decrease and end at most at the sequence length "
            f"{total_length}; got {list(cu_seqlens)}")
    boundaries = torch.tensor(cu_seqlens[1:])
    return [torch.bucketize(zigzag_positions(total_length, cp_size, rank), boundaries, right=True)
            for rank in range(cp_size)]


@functools.lru_cache(maxsize=64)
def plan_ring(cp_size: int, cp_rank: int, local_length: int,
              cu_seqlens: Optional[tuple[int, ...]] = None) -> tuple[RingStep, ...]:
    """The block work of each ring step for one rank; ``cu_seqlens`` are global boundaries."""
    half = local_length // 2
    documents = _document_ids(cu_seqlens, local_length * cp_size, cp_size) if cu_seqlens is not None else None
    steps = []
    for step in range(cp_size):
        source = (cp_rank - step) % cp_size
        if source == cp_rank:
            rows, cols = (0, local_length), (0, local_length)
        elif source < cp_rank:
            rows, cols = (0, local_length), (0, half)
        else:
            rows, cols = (half, local_length), (0, local_length)
        segments = ((Segment(*rows, *cols),) if documents is None
                    else _document_segments(rows, cols, documents[cp_rank], documents[source]))
        steps.append(RingStep(source, source == cp_rank, segments))
    return tuple(steps)


class RingExchange:
    """Sends a buffer to the next CP rank while receiving the previous rank's into another."""

    def __init__(self, group: dist.ProcessGroup, tag: int) -> None:
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        self._next = dist.get_global_rank(group, (rank + 1) % size)
        self._prev = dist.get_global_rank(group, (rank - 1) % size)
        self._group, self._tag = group, tag
        self._requests: list[dist.Work] = []

    def start(self, send: Tensor, recv: Tensor) -> None:
        self._requests = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, send, self._next, self._group, self._tag),
            dist.P2POp(dist.irecv, recv, self._prev, self._group, self._tag),
        ])

    def wait(self) -> None:
        for request in self._requests:
            request.wait()
        self._requests = []


def _ring_forward(q: Tensor, kv: Tensor, steps: Sequence[RingStep], group: Optional[dist.ProcessGroup],
                  kernel: BlockKernel, scale: float) -> tuple[Tensor, Tensor]:
    exchange = RingExchange(group, _KV_TAG) if len(steps) > 1 else None
    buffers = (kv, torch.empty_like(kv))
    out = lse = None
    for i, step in enumerate(steps):
        current = buffers[i % 2]
        if i + 1 < len(steps):
            exchange.start(current, buffers[(i + 1) % 2])
        block_out, block_lse = kernel.forward(q, current[0], current[1], step.segments, step.causal, scale)
        if out is None:  # step 0 is the diagonal block: every query sees itself, so lse is finite
            out, lse = block_out.to(block_lse.dtype), block_lse
        else:
            out, lse = merge_partial_attention(out, lse, block_out, block_lse)
        if i + 1 < len(steps):
            exchange.wait()
    return out, lse


def _ring_backward(dout: Tensor, q: Tensor, kv: Tensor, out: Tensor, lse: Tensor, steps: Sequence[RingStep],
                   group: Optional[dist.ProcessGroup], kernel: BlockKernel, scale: float) -> tuple[Tensor, Tensor]:
    ring = len(steps) > 1
    kv_exchange = RingExchange(group, _KV_TAG) if ring else None
    dkv_exchange = RingExchange(group, _DKV_TAG) if ring else None
    kv_buffers = (kv, torch.empty_like(kv))
    # the dK/dV accumulator of a block travels with it: zeros at home, partial sums after
    dkv_buffers = (torch.zeros(kv.shape, dtype=lse.dtype, device=kv.device),
                   torch.empty(kv.shape, dtype=lse.dtype, device=kv.device))
    dq = torch.zeros(q.shape, dtype=lse.dtype, device=q.device)
    dkv = dkv_buffers[0]
    for i, step in enumerate(steps):
        current = kv_buffers[i % 2]
        if i + 1 < len(steps):
            kv_exchange.start(current, kv_buffers[(i + 1) % 2])
        dq_block, dk_block, dv_block = kernel.backward(dout, q, current[0], current[1], out, lse,
                                                       step.segments, step.causal, scale)
        dq += dq_block
        if i > 0:
            dkv_exchange.wait()
        dkv = dkv_buffers[i % 2]
        dkv[0] += dk_block
        dkv[1] += dv_block
        if ring:
            dkv_exchange.start(dkv, dkv_buffers[(i + 1) % 2])
        if i + 1 < len(steps):
            kv_exchange.wait()
    if ring:  # the last hop brings each rank the full gradient of its own block
        dkv_exchange.wait()
        dkv = dkv_buffers[len(steps) % 2]
    return dq, dkv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, steps: tuple[RingStep, ...],
                group: Optional[dist.ProcessGroup], kernel: BlockKernel, scale: float) -> Tensor:
        # the kv ring buffers get overwritten from the third step on: keep k, v themselves
        out, lse = _ring_forward(q, torch.stack([k, v]), steps, group, kernel, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.steps, ctx.group, ctx.kernel, ctx.scale = steps, group, kernel, scale
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dkv = _ring_backward(dout, q, torch.stack([k, v]), out, lse, ctx.steps, ctx.group,
                                 ctx.kernel, ctx.scale)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def ring_attention(query: Tensor, key: Tensor, value: Tensor, group: Optional[dist.ProcessGroup] = None, *,
                   kernel: str, cu_seqlens: Optional[Tensor | Sequence[int]] = None,
                   softmax_scale: Optional[float] = None) -> Tensor:
    """Causal attention of zigzag-split q/k/v over the CP ``group`` (None: no CP).

    query [s, b, hq, d], key/value [s, b, hkv, d] with hq a multiple of hkv, s = this rank's
    2 chunks. ``cu_seqlens``: global document boundaries of the padded sequence (reset
    packing, b = 1); None means plain causal. ``kernel``: a BLOCK_KERNELS name, the
    platform's ``attention_kernel`` in the model. Returns [s, b, hq, d].
    """
    cp_size = dist.get_world_size(group) if group is not None else 1
    cp_rank = dist.get_rank(group) if group is not None else 0
    length, batch, q_heads, head_dim = query.shape
    if key.shape != value.shape or key.shape[:2] != (length, batch) or q_heads % key.shape[2]:
        raise ValueError(f"ring attention needs key/value [s, b, hkv, d] with hq divisible by hkv and the "
                         f"query's s, b; got query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}")
    if length % 2:
        raise ContextParallelLayoutError(f"local sequence length {length} is odd: a zigzag share is two equal "
                                         "chunks (split with zigzag_split / split_batch_for_context_parallel)")
    documents = None
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"packed documents (cu_seqlens) need micro-batch size 1, got {batch}")
        documents = tuple(cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens)
    steps = plan_ring(cp_size, cp_rank, length, documents)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    to_bhsd = lambda t: t.permute(1, 2, 0, 3)  # noqa: E731  (a view: [s, b, h, d] -> [b, h, s, d])
    out = _RingAttention.apply(to_bhsd(query), to_bhsd(key), to_bhsd(value), steps, group,
                               BLOCK_KERNELS.get(kernel), scale)
    return out.permute(2, 0, 1, 3)
