"""Block kernels and single-rank ring attention against naive full attention (float64)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_longvita.parallel import BLOCK_KERNELS, Segment, ring_attention
from megatron_longvita.platform import describe_platform
from tests.references import reference_attention

KERNELS = ["cpu_flash", "math"]


def _qkv(
    length: int,
    batch: int,
    q_heads: int,
    kv_heads: int,
    dim: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(length, batch, heads, dim, generator=generator, dtype=dtype)
        for heads in (q_heads, kv_heads, kv_heads)
    ]


def _bhsd(t: torch.Tensor) -> torch.Tensor:
    return t.permute(1, 2, 0, 3)


@pytest.mark.parametrize("kernel", KERNELS)
def test_block_kernel_segments_leave_uncovered_rows_empty(kernel: str) -> None:
    """Rows outside every segment: out 0, lse -inf, zero gradient, no NaN anywhere."""
    q, k, v = (_bhsd(t) for t in _qkv(10, 1, 4, 2))
    segments = [Segment(0, 3, 2, 7), Segment(6, 10, 7, 9)]  # rows 3..5 see nothing
    out, lse = BLOCK_KERNELS.get(kernel).forward(q, k, v, segments, False, 0.5)
    assert torch.isneginf(lse[:, :, 3:6]).all() and (out[:, :, 3:6] == 0).all()
    for seg in segments:
        rows, cols = slice(seg.q_start, seg.q_end), slice(seg.k_start, seg.k_end)
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, rows], k[:, :, cols], v[:, :, cols], scale=0.5, enable_gqa=True
        )
        torch.testing.assert_close(out[:, :, rows], expected, atol=1e-12, rtol=0)
    dout = torch.randn_like(out)
    grads = BLOCK_KERNELS.get(kernel).backward(dout, q, k, v, out, lse, segments, False, 0.5)
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][:, :, 3:6] == 0).all()


CASES = {
    "causal_mha": dict(batch=2, q_heads=2, kv_heads=2, cu_seqlens=None),
    "causal_gqa_8x2": dict(batch=2, q_heads=8, kv_heads=2, cu_seqlens=None),
    "documents_gqa": dict(batch=1, q_heads=8, kv_heads=2, cu_seqlens=[0, 1, 6, 7, 15, 16]),
}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES)
def test_single_rank_ring_matches_reference(kernel: str, case: str) -> None:
    spec = CASES[case]
    q, k, v = (t.requires_grad_() for t in _qkv(16, spec["batch"], spec["q_heads"], spec["kv_heads"]))
    out = ring_attention(q, k, v, cu_seqlens=spec["cu_seqlens"], kernel=kernel)
    expected = reference_attention(q, k, v, spec["cu_seqlens"])
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flash_attn_kernel_falls_back_to_math_outside_fp16_bf16(dtype: torch.dtype) -> None:
    """flash-attn has no fp32 path: the kernel the CUDA platform picks must still run fp32 models."""
    q, k, v = (_bhsd(t) for t in _qkv(12, 2, 4, 2, dtype=dtype))
    segments = [Segment(0, 5, 0, 5), Segment(5, 12, 5, 12)]
    flash, math_kernel = BLOCK_KERNELS.get("flash_attn"), BLOCK_KERNELS.get("math")
    out, lse = flash.forward(q, k, v, segments, True, 0.3)  # no flash_attn import: it is not installed here
    expected_out, expected_lse = math_kernel.forward(q, k, v, segments, True, 0.3)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    dout = torch.randn_like(out)
    grads = flash.backward(dout, q, k, v, out, lse, segments, True, 0.3)
    for got, want in zip(grads, math_kernel.backward(dout, q, k, v, out, lse, segments, True, 0.3)):
        assert torch.equal(got, want)


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="checks the error without torch_npu")
def test_npu_kernel_is_registered_and_names_torch_npu_when_missing() -> None:
    kernel = BLOCK_KERNELS.get(describe_platform("npu").attention_kernel)
    q, k, v = (_bhsd(t) for t in _qkv(4, 1, 2, 1, dtype=torch.float16))
    segments = [Segment(0, 4, 0, 4)]
    with pytest.raises(ImportError, match="torch_npu"):
        kernel.forward(q, k, v, segments, True, 0.5)
    lse = torch.zeros(q.shape[:-1])
    with pytest.raises(ImportError, match="torch_npu"):
        kernel.backward(q, q, k, v, q, lse, segments, True, 0.5)
