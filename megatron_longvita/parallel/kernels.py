"""Block kernels for ring attention: one (query block, key/value block) attention call.

A block is a list of :class:`Segment`\\ s: query rows ``[q_start, q_end)`` attend to key
rows ``[k_start, k_end)``, either fully or causally (a causal segment is square and
diagonal-aligned). Segments are how packed documents reach the kernel: one segment per
document present in both blocks, so no [sq, sk] mask is ever built. Query rows outside
every segment see no key in this block: their output is 0 and their log-sum-exp -inf, so
the ring merge ignores them.

Tensors are [b, heads, s, head_dim]; k and v may have fewer heads than q (GQA: query
head h reads key/value head h // (hq // hkv), megatron's layout), never repeated here.
The log-sum-exp is [b, hq, sq] in float32 (float64 for float64 inputs). ``backward``
takes the ring's *final* output and log-sum-exp, so each block's softmax probabilities
are the global ones and the per-block gradients simply add up.

Kernels are registered under :attr:`Platform.attention_kernel` names: "cpu_flash",
"flash_attn", "npu_fusion_attention", "sdpa" (the math kernel) and "math".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_longvita.registry import Registry


@dataclass(frozen=True)
class Segment:
    q_start: int
    q_end: int
    k_start: int
    k_end: int


class BlockKernel(Protocol):
    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, segments: Sequence[Segment], causal: bool, scale: float
    ) -> tuple[Tensor, Tensor]:
        """(out [b, hq, sq, d], lse [b, hq, sq]) of q attending to the segments of k/v."""

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        segments: Sequence[Segment],
        causal: bool,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(dq, dk, dv) of this block, given the final ``out``/``lse`` of the ring."""


BLOCK_KERNELS: Registry[BlockKernel] = Registry("ring attention block kernel")


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_partial_attention(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two partial attentions over disjoint keys (online softmax in log-sum-exp form):
    out [..., d], lse [...]. A row with block_lse=-inf is left as is. Cached decoding merges its
    CP ranks with it; the ring merges its steps with the in-place :func:`merge_partial_attention_`."""
    weight = torch.sigmoid(block_lse - lse).unsqueeze(-1)
    return out - weight * (out - block_out), lse - F.logsigmoid(lse - block_lse)


def merge_partial_attention_(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """:func:`merge_partial_attention` in place, into ``out`` and ``lse`` (views allowed): no new
    tensors the size of ``out``, as the ring's accumulators need."""
    weight = torch.sigmoid(block_lse - lse).unsqueeze(-1)
    out.lerp_(block_out.to(out.dtype), weight)  # out + weight * (block_out - out)
    lse.sub_(F.logsigmoid(lse - block_lse))


def _covers(segments: Sequence[Segment], q: Tensor, k: Tensor) -> bool:
    """One segment spanning the whole block."""
    return len(segments) == 1 and segments[0] == Segment(0, q.shape[2], 0, k.shape[2])


class SegmentLoopKernel:
    """Runs a dense per-segment primitive once per segment and scatters the results.

    Subclasses provide ``_attend`` / ``_attend_backward`` on one dense segment (no mask,
    ``causal`` top-left aligned on a square segment).
    """

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, segments: Sequence[Segment], causal: bool, scale: float
    ) -> tuple[Tensor, Tensor]:
        if _covers(segments, q, k):  # the primitive's own outputs: no zero-filled copy to scatter into
            out, lse = self._attend(q, k, v, causal, scale)
            return out, lse.to(lse_dtype(q.dtype))
        # [b, s, h, d] in memory, as ATen's flash kernels return it: the caller's [s, b, h * d] view needs no copy
        batch, heads, length, _ = q.shape
        out = q.new_zeros(batch, length, heads, v.shape[-1]).transpose(1, 2)
        lse = torch.full(q.shape[:-1], -math.inf, dtype=lse_dtype(q.dtype), device=q.device)
        for seg in segments:
            rows, cols = slice(seg.q_start, seg.q_end), slice(seg.k_start, seg.k_end)
            out[:, :, rows], lse[:, :, rows] = self._attend(q[:, :, rows], k[:, :, cols], v[:, :, cols], causal, scale)
        return out, lse

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        segments: Sequence[Segment],
        causal: bool,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        if _covers(segments, q, k):
            return self._attend_backward(dout, q, k, v, out, lse, causal, scale)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for seg in segments:  # documents are disjoint: every row/column is written at most once
            rows, cols = slice(seg.q_start, seg.q_end), slice(seg.k_start, seg.k_end)
            dq[:, :, rows], dk[:, :, cols], dv[:, :, cols] = self._attend_backward(
                dout[:, :, rows],
                q[:, :, rows],
                k[:, :, cols],
                v[:, :, cols],
                out[:, :, rows],
                lse[:, :, rows],
                causal,
                scale,
            )
        return dq, dk, dv

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _attend_backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError


class CpuFlashKernel(SegmentLoopKernel):
    """ATen's CPU flash attention: blockwise, returns the log-sum-exp, GQA-aware."""

    def _attend(self, q, k, v, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)

    def _attend_backward(self, dout, q, k, v, out, lse, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale
        )


class MathKernel(SegmentLoopKernel):
    """Plain matmul + softmax on any device; materialises one segment's [sq, sk] scores.

    Also serves the CUDA "sdpa" family: torch's public SDPA returns no log-sum-exp, and its
    private per-backend ops differ in layout and dtype support.
    """

    def _scores(self, q: Tensor, k: Tensor, causal: bool, scale: float) -> Tensor:
        dtype = lse_dtype(q.dtype)  # scores and softmax in fp32 at least, like the flash kernels
        grouped_q = q.unflatten(1, (k.shape[1], -1)).to(dtype)  # [b, hkv, g, sq, d]: no repeated k/v
        scores = torch.matmul(grouped_q, k.unsqueeze(2).transpose(-1, -2).to(dtype)) * scale
        if causal:
            sq, sk = scores.shape[-2:]
            scores = scores.masked_fill(torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1), -math.inf)
        return scores

    def _attend(self, q, k, v, causal, scale):
        scores = self._scores(q, k, causal, scale)
        lse = scores.logsumexp(-1)
        out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.unsqueeze(2).to(scores.dtype))
        return out.flatten(1, 2).to(q.dtype), lse.flatten(1, 2)

    def _attend_backward(self, dout, q, k, v, out, lse, causal, scale):
        hkv = k.shape[1]
        grouped = lambda t: t.unflatten(1, (hkv, -1))  # noqa: E731
        probs = torch.exp(self._scores(q, k, causal, scale) - grouped(lse).unsqueeze(-1))
        dout_g = grouped(dout).to(probs.dtype)
        dv = torch.matmul(probs.transpose(-1, -2), dout_g).sum(2)
        dprobs = torch.matmul(dout_g, v.unsqueeze(2).transpose(-1, -2).to(probs.dtype))
        delta = (dout_g * grouped(out).to(probs.dtype)).sum(-1, keepdim=True)  # rowsum(dO * O)
        dscores = probs * (dprobs - delta) * scale
        dq = torch.matmul(dscores, k.unsqueeze(2).to(probs.dtype)).flatten(1, 2)
        dk = torch.matmul(dscores.transpose(-1, -2), grouped(q).to(probs.dtype)).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FlashAttnKernel(SegmentLoopKernel):
    """flash-attn >= 2.7 (fp16/bf16, [b, s, h, d] views, GQA-aware), imported on first use.

    The CUDA platform picks this kernel whenever flash-attn is installed, whatever the
    model's dtype, and flash-attn has no fp32 path: other dtypes fall back to the math
    kernel (exact, but it materialises each segment's [sq, sk] scores).

    Not exercised by this repository's CPU tests; run tests/distributed/test_ring_attention.py
    with the CUDA platform to check it. A varlen call per block would replace the segment loop.
    """

    DTYPES = (torch.float16, torch.bfloat16)
    _fallback = MathKernel()

    def forward(self, q, k, v, segments, causal, scale):
        kernel = super() if q.dtype in self.DTYPES else self._fallback
        return kernel.forward(q, k, v, segments, causal, scale)

    def backward(self, dout, q, k, v, out, lse, segments, causal, scale):
        kernel = super() if q.dtype in self.DTYPES else self._fallback
        return kernel.backward(dout, q, k, v, out, lse, segments, causal, scale)

    def _attend(self, q, k, v, causal, scale):
        from flash_attn.flash_attn_interface import _flash_attn_forward

        out, lse, _, _ = _flash_attn_forward(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=0.0,
            softmax_scale=scale,
            causal=causal,
            window_size_left=-1,
            window_size_right=-1,
            softcap=0.0,
            alibi_slopes=None,
            return_softmax=False,
        )
        return out.transpose(1, 2), lse

    def _attend_backward(self, dout, q, k, v, out, lse, causal, scale):
        from flash_attn.flash_attn_interface import _flash_attn_backward

        bshd = [t.transpose(1, 2) for t in (dout, q, k, v, out)]
        grads = [torch.empty_like(t) for t in bshd[1:4]]
        _flash_attn_backward(
            *bshd,
            lse.contiguous(),
            *grads,
            dropout_p=0.0,
            softmax_scale=scale,
            causal=causal,
            window_size_left=-1,
            window_size_right=-1,
            softcap=0.0,
            alibi_slopes=None,
            deterministic=False,
        )
        return tuple(g.transpose(1, 2) for g in grads)


def _torch_npu() -> ModuleType:
    try:
        import torch_npu
    except ImportError as error:
        raise ImportError(
            "the npu_fusion_attention block kernel needs torch_npu (Ascend's PyTorch adapter); "
            "install it, or pick another kernel (ring_attention(kernel=...))"
        ) from error
    return torch_npu


@functools.cache
def _npu_causal_mask(device: torch.device) -> Tensor:
    """The op's compressed causal mask for sparse_mode 3: a fixed 2048 x 2048 upper triangle (True = masked)."""
    return torch.ones(2048, 2048, dtype=torch.bool, device=device).triu(1)


class NpuFusionAttentionKernel(SegmentLoopKernel):
    """Ascend's fused attention, ``torch_npu.npu_fusion_attention`` (+ ``_grad``), imported on first use.

    BNSD layout: k/v keep their hkv heads (the op supports GQA with hq a multiple of hkv).
    A causal segment is square, so the op's right-down causal mode (sparse_mode 3, with its
    compressed 2048 x 2048 mask) is the diagonal-aligned triangle we need. The op returns
    softmax_max and softmax_sum [b, hq, sq, 8] (the value replicated over the last dim), of
    the scaled scores: lse = max + log(sum), as MindSpeed's ring attention does. Its
    backward takes (max, sum); the ring's final lse is passed as (lse, 1), which gives the
    same probabilities exp(scores - lse). dtypes are the op's: fp16/bf16, plus fp32 on recent
    CANN versions.

    Not exercised by this repository's tests (no NPU here); run
    tests/distributed/test_ring_attention.py on an NPU with the npu platform to check it.
    """

    def _sparse_args(self, q: Tensor, k: Tensor, causal: bool) -> dict:
        sk = k.shape[2]
        if causal:
            return dict(atten_mask=_npu_causal_mask(q.device), sparse_mode=3, pre_tockens=sk, next_tockens=0)
        return dict(atten_mask=None, sparse_mode=0, pre_tockens=sk, next_tockens=sk)

    def _attend(self, q, k, v, causal, scale):
        out, softmax_max, softmax_sum, *_ = _torch_npu().npu_fusion_attention(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            q.shape[1],
            "BNSD",
            scale=scale,
            keep_prob=1.0,
            **self._sparse_args(q, k, causal),
        )
        return out, softmax_max[..., 0] + softmax_sum[..., 0].log()

    def _attend_backward(self, dout, q, k, v, out, lse, causal, scale):
        softmax_max = lse.unsqueeze(-1).expand(*lse.shape, 8).contiguous()
        dq, dk, dv, *_ = _torch_npu().npu_fusion_attention_grad(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            dout.contiguous(),
            q.shape[1],
            "BNSD",
            softmax_max=softmax_max,
            softmax_sum=torch.ones_like(softmax_max),
            attention_in=out.contiguous(),
            scale_value=scale,
            keep_prob=1.0,
            **self._sparse_args(q, k, causal),
        )
        return dq, dk, dv


BLOCK_KERNELS.register("cpu_flash")(CpuFlashKernel())
BLOCK_KERNELS.register("flash_attn")(FlashAttnKernel())
BLOCK_KERNELS.register("math")(MathKernel())
BLOCK_KERNELS.register("npu_fusion_attention")(NpuFusionAttentionKernel())
BLOCK_KERNELS.register("sdpa")(BLOCK_KERNELS.get("math"))
