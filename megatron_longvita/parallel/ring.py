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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_longvita.parallel.kernels import BLOCK_KERNELS, BlockKernel, Segment, merge_partial_attention_
from megatron_longvita.parallel.zigzag import ContextParallelLayoutError, zigzag_positions

_KV_TAG, _DKV_TAG = 0, 2  # K and V (dK and dV) each take a tag


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


def _document_segments(
    rows: tuple[int, int], cols: tuple[int, int], q_documents: Tensor, k_documents: Tensor
) -> tuple[Segment, ...]:
    """One segment per document present among both the query rows and the key columns."""
    q_runs, k_runs = _document_runs(q_documents, *rows), _document_runs(k_documents, *cols)
    return tuple(Segment(*q_runs[doc], *k_runs[doc]) for doc in q_runs if doc in k_runs)


def _document_ids(cu_seqlens: tuple[int, ...], total_length: int, cp_size: int) -> list[Tensor]:
    """Per CP rank, the document index of each local token (padding past the end is its own)."""
    decreasing = any(b < a for a, b in zip(cu_seqlens, cu_seqlens[1:]))
    if not cu_seqlens or cu_seqlens[0] != 0 or decreasing or cu_seqlens[-1] > total_length:
        raise ContextParallelLayoutError(
            f"cu_seqlens must start at 0, not decrease and end at most at the sequence length "
            f"{total_length}; got {list(cu_seqlens)}"
        )
    boundaries = torch.tensor(cu_seqlens[1:])
    return [
        torch.bucketize(zigzag_positions(total_length, cp_size, rank), boundaries, right=True)
        for rank in range(cp_size)
    ]


@functools.lru_cache(maxsize=64)
def plan_ring(
    cp_size: int, cp_rank: int, local_length: int, cu_seqlens: Optional[tuple[int, ...]] = None
) -> tuple[RingStep, ...]:
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
        segments = (
            (Segment(*rows, *cols),)
            if documents is None
            else _document_segments(rows, cols, documents[cp_rank], documents[source])
        )
        steps.append(RingStep(source, source == cp_rank, segments))
    return tuple(steps)


class RingExchange:
    """Sends tensors to the next CP rank while receiving the previous rank's into others (one tag each)."""

    def __init__(self, group: dist.ProcessGroup, tag: int) -> None:
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        self._next = dist.get_global_rank(group, (rank + 1) % size)
        self._prev = dist.get_global_rank(group, (rank - 1) % size)
        self._group, self._tag = group, tag
        self._requests: list[dist.Work] = []

    def start(self, send: Sequence[Tensor], recv: Sequence[Tensor]) -> None:
        ops = []
        for i, (outgoing, incoming) in enumerate(zip(send, recv, strict=True)):
            ops += [
                dist.P2POp(dist.isend, outgoing, self._next, self._group, self._tag + i),
                dist.P2POp(dist.irecv, incoming, self._prev, self._group, self._tag + i),
            ]
        self._requests = dist.batch_isend_irecv(ops)

    def wait(self) -> None:
        for request in self._requests:
            request.wait()
        self._requests = []


def _box(step: RingStep) -> tuple[slice, slice, tuple[Segment, ...]]:
    """The rows and columns a step's segments span, and the segments relative to that box.

    The kernel runs on the box only, so its outputs are the size of the work (half the rows or
    columns off the diagonal) and are added into the accumulators' slices, never scattered
    into a zero-filled block.
    """
    row0, row1 = min(seg.q_start for seg in step.segments), max(seg.q_end for seg in step.segments)
    col0, col1 = min(seg.k_start for seg in step.segments), max(seg.k_end for seg in step.segments)
    local = tuple(
        Segment(seg.q_start - row0, seg.q_end - row0, seg.k_start - col0, seg.k_end - col0) for seg in step.segments
    )
    return slice(row0, row1), slice(col0, col1), local


def _bhsd(t: Tensor) -> Tensor:
    return t.permute(1, 2, 0, 3)  # a view: [s, b, h, d] -> [b, h, s, d]


def _sbhd(t: Tensor) -> Tensor:
    return t.permute(2, 0, 1, 3)  # a view: [b, h, s, d] -> [s, b, h, d]


def _on_the_wire(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` [s, b, h, d] as a dense tensor of ``dtype`` to send; ``t`` itself when it already is one."""
    if t.is_contiguous() and t.dtype == dtype:
        return t
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)  # one copy, whatever t's strides


class _KeyValueRing:
    """The K/V blocks of the ring steps, [s, b, hkv, d]: step 0 sends the inputs themselves.

    Buffers are received into, never written otherwise: one at CP=2, two from CP=3 on (the
    inputs must survive, they are saved for the backward; they are copied only when not dense).
    """

    def __init__(self, k: Tensor, v: Tensor, steps: int, group: Optional[dist.ProcessGroup]) -> None:
        self._inputs = (k, v)
        self._current = (k, v) if steps == 1 else (_on_the_wire(k, k.dtype), _on_the_wire(v, v.dtype))
        self._steps = steps
        self._exchange = RingExchange(group, _KV_TAG) if steps > 1 else None
        self._spare: Optional[tuple[Tensor, Tensor]] = None
        self._incoming: Optional[tuple[Tensor, Tensor]] = None

    def block(self, i: int) -> tuple[Tensor, Tensor]:
        """Step i's block; starts receiving step i + 1's."""
        if i + 1 < self._steps:
            self._incoming = self._spare or tuple(torch.empty_like(t) for t in self._current)
            self._exchange.start(self._current, self._incoming)
        return self._current

    def advance(self, i: int) -> None:
        """Waits for step i + 1's block; the block of step i becomes a receive buffer unless it is an input."""
        if i + 1 < self._steps:
            self._exchange.wait()
            self._spare = None if self._current[0] is self._inputs[0] else self._current
            self._current, self._incoming = self._incoming, None


def _ring_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    steps: Sequence[RingStep],
    group: Optional[dist.ProcessGroup],
    kernel: BlockKernel,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """q [b, hq, s, d], k/v [s, b, hkv, d] -> out [b, hq, s, d] (lse dtype) and lse [b, hq, s]."""
    ring = _KeyValueRing(k, v, len(steps), group)
    out = lse = None
    for i, step in enumerate(steps):
        block_k, block_v = ring.block(i)
        if step.segments:
            rows, cols, segments = _box(step)
            block_out, block_lse = kernel.forward(
                q[:, :, rows], _bhsd(block_k)[:, :, cols], _bhsd(block_v)[:, :, cols], segments, step.causal, scale
            )
            if out is None:  # step 0 is the diagonal block: every query sees itself, so lse is finite
                out, lse = block_out.to(block_lse.dtype), block_lse
            else:
                merge_partial_attention_(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
        ring.advance(i)
    return out, lse


def _ring_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    steps: Sequence[RingStep],
    group: Optional[dist.ProcessGroup],
    kernel: BlockKernel,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq [b, hq, s, d] and dk, dv [s, b, hkv, d], in the lse dtype under CP (the kernel's at CP=1).

    The dK/dV accumulator of a block travels with it: it starts as the diagonal step's block
    gradients and arrives home, complete, after a full turn; two accumulators are live on a
    rank (the one being added to and sent, the one being received).
    """
    ring = _KeyValueRing(k, v, len(steps), group)
    dkv_exchange = RingExchange(group, _DKV_TAG) if len(steps) > 1 else None
    dq = dkv = incoming = None
    for i, step in enumerate(steps):
        block_k, block_v = ring.block(i)
        if step.segments:
            rows, cols, segments = _box(step)
            dq_block, dk_block, dv_block = kernel.backward(
                dout[:, :, rows],
                q[:, :, rows],
                _bhsd(block_k)[:, :, cols],
                _bhsd(block_v)[:, :, cols],
                out[:, :, rows],
                lse[:, :, rows],
                segments,
                step.causal,
                scale,
            )
        if i == 0:  # the diagonal block: rows and columns cover the whole block
            dq = dq_block.to(lse.dtype) if dkv_exchange else dq_block
            dkv = (_sbhd(dk_block), _sbhd(dv_block))
            if dkv_exchange:
                dkv = tuple(_on_the_wire(t, lse.dtype) for t in dkv)
        else:
            if step.segments:
                dq[:, :, rows] += dq_block
            dkv_exchange.wait()
            dkv, incoming = incoming, dkv
            if step.segments:
                _bhsd(dkv[0])[:, :, cols] += dk_block
                _bhsd(dkv[1])[:, :, cols] += dv_block
        dq_block = dk_block = dv_block = None
        if dkv_exchange:  # the sent accumulator is received into next step (and home after the last)
            incoming = incoming if incoming is not None else tuple(torch.empty_like(t) for t in dkv)
            dkv_exchange.start(dkv, incoming)
        ring.advance(i)
    if dkv_exchange:  # the last hop brings each rank the full gradient of its own block
        dkv_exchange.wait()
        dkv = incoming
    return dq, dkv[0], dkv[1]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        steps: tuple[RingStep, ...],
        group: Optional[dist.ProcessGroup],
        kernel: BlockKernel,
        scale: float,
    ) -> Tensor:
        """q [b, hq, s, d], k/v [s, b, hkv, d]; the inputs are saved as they are (no copies)."""
        out, lse = _ring_forward(q, k, v, steps, group, kernel, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.steps, ctx.group, ctx.kernel, ctx.scale = steps, group, kernel, scale
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, ctx.steps, ctx.group, ctx.kernel, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    kernel: str,
    cu_seqlens: Optional[Tensor | Sequence[int]] = None,
    softmax_scale: Optional[float] = None,
) -> Tensor:
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
        raise ValueError(
            f"ring attention needs key/value [s, b, hkv, d] with hq divisible by hkv and the "
            f"query's s, b; got query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"value {tuple(value.shape)}"
        )
    if length % 2:
        raise ContextParallelLayoutError(
            f"local sequence length {length} is odd: a zigzag share is two equal "
            "chunks (split with zigzag_split / split_batch_for_context_parallel)"
        )
    documents = None
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"packed documents (cu_seqlens) need micro-batch size 1, got {batch}")
        documents = tuple(cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens)
    steps = plan_ring(cp_size, cp_rank, length, documents)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    out = _RingAttention.apply(_bhsd(query), key, value, steps, group, BLOCK_KERNELS.get(kernel), scale)
    return out.permute(2, 0, 1, 3)
