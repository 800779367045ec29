"""Ring attention on CP=2/4 gloo ranks against naive full attention, and the tiny decoder
at TP=2 x CP=2 against the same weights at CP=1."""

from __future__ import annotations

import os
from typing import Optional

import pytest
import torch
import torch.distributed as dist

from tests.harness import run_distributed
from tests.references import reference_attention

# name -> (document lengths or None for plain causal, batch, query heads, kv heads, dtype)
# Lengths are in units of the chunk size c = total / (2 * CP) where marked "c"; else tokens.
CASES = {
    "causal_gqa_8x2": (None, 2, 8, 2, torch.float64),
    "causal_gqa_8x2_fp32": (None, 2, 8, 2, torch.float32),
    # lengths 1, a document crossing every rank, then odd lengths
    "documents_gqa_8x2": ("crossing", 1, 8, 2, torch.float64),
    "documents_gqa_8x2_fp32": ("crossing", 1, 8, 2, torch.float32),
    # 23 tokens: padded to a multiple of 2 * CP, the padding its own document; MQA
    "documents_padded_mqa": ([3, 1, 17, 2], 1, 4, 1, torch.float64),
}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _document_lengths(kind, cp_size: int) -> Optional[list[int]]:
    if kind == "crossing":
        total = 12 * cp_size  # chunks of 6; the second document runs from chunk 0 into chunk 2CP-3
        return [1, total - 12, 1, 3, 7]
    return kind


def _compare_case(name: str, kernel: str, group: dist.ProcessGroup) -> dict[str, float]:
    from megatron_longvita.parallel import pad_for_context_parallel, ring_attention, zigzag_split

    kind, batch, q_heads, kv_heads, dtype = CASES[name]
    cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
    lengths = _document_lengths(kind, cp_size)
    cu_seqlens = None
    if lengths is None:
        total = 16 * cp_size
    else:
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        padded = pad_for_context_parallel({"tokens": torch.zeros(1, sum(lengths)), "cu_seqlens": cu}, cp_size)
        cu_seqlens, total = padded["cu_seqlens"], padded["tokens"].shape[1]
    generator = torch.Generator().manual_seed(hash(name) % 2**31)
    full = [
        torch.randn(total, batch, heads, 8, generator=generator, dtype=torch.float64).requires_grad_()
        for heads in (q_heads, kv_heads, kv_heads)
    ]
    dout = torch.randn(total, batch, q_heads, 8, generator=generator, dtype=torch.float64)
    expected = reference_attention(*full, None if cu_seqlens is None else cu_seqlens.tolist())
    expected_grads = torch.autograd.grad(expected, full, dout)

    split = lambda t: zigzag_split(t.detach(), 0, cp_size, cp_rank)  # noqa: E731
    local = [split(t).to(dtype).requires_grad_() for t in full]
    out = ring_attention(*local, group, cu_seqlens=cu_seqlens, kernel=kernel)
    grads = torch.autograd.grad(out, local, split(dout).to(dtype))
    errors = {"out": (out.double() - split(expected)).abs().max().item()}
    for label, got, want in zip(("dq", "dk", "dv"), grads, expected_grads):
        errors[label] = (got.double() - split(want)).abs().max().item()
    return errors


def _init_context_parallel() -> dist.ProcessGroup:
    """Every rank in one CP group (megatron's parallel_state, as the model sees it)."""
    from megatron.core import parallel_state

    from megatron_longvita.config.parallel import ParallelConfig
    from megatron_longvita.platform import initialize_distributed

    initialize_distributed(ParallelConfig(context_parallel_size=int(os.environ["WORLD_SIZE"])))
    return parallel_state.get_context_parallel_group()


def _ring_vs_reference(kernel: str) -> dict[str, dict[str, float]]:
    group = _init_context_parallel()
    return {name: _compare_case(name, kernel, group) for name in CASES}


@pytest.mark.parametrize("kernel", ["cpu_flash", "math"])
@pytest.mark.parametrize("cp_size", [2, 4])
def test_ring_attention_matches_full_attention(cp_size: int, kernel: str) -> None:
    results = run_distributed(_ring_vs_reference, cp_size, kernel, timeout=120)
    for rank, per_case in enumerate(results):
        for name, errors in per_case.items():
            tolerance = TOLERANCE[CASES[name][4]]
            assert max(errors.values()) < tolerance, f"rank {rank} {name}: {errors}"


def _layout_utilities() -> dict[str, bool]:
    """zigzag_gather inverts the split, megatron's CP batch split agrees, the training loss summed
    over the CP shares (as megatron's per-token-loss reduction does) is the global mean."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_longvita.parallel import split_batch_for_context_parallel, zigzag_gather, zigzag_split
    from megatron_longvita.training.loop import masked_loss

    group = _init_context_parallel()
    cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
    generator = torch.Generator().manual_seed(3)
    batch = {
        "tokens": torch.randint(0, 100, (2, 8 * cp_size), generator=generator),
        "labels": torch.randint(0, 100, (2, 8 * cp_size), generator=generator),
        "loss_mask": (torch.rand(2, 8 * cp_size, generator=generator) > 0.3).float(),
        "position_ids": torch.arange(8 * cp_size).expand(2, -1).contiguous(),
    }
    ours = split_batch_for_context_parallel(batch, cp_size, cp_rank)
    megatrons = get_batch_on_this_cp_rank(dict(batch), group)
    per_token = torch.rand(2, 8 * cp_size, generator=generator)
    loss_sum, num_tokens, _ = masked_loss(ours["loss_mask"], zigzag_split(per_token, 1, cp_size, cp_rank))
    totals = torch.stack([loss_sum, num_tokens.float()])
    dist.all_reduce(totals, group=group)
    full_mean = (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    return {
        "matches_megatron_split": all(torch.equal(ours[key], megatrons[key]) for key in batch),
        "gather_inverts_split": torch.equal(zigzag_gather(ours["tokens"], 1, group), batch["tokens"]),
        "loss_over_shares_is_global_mean": torch.allclose(totals[0] / totals[1], full_mean, atol=1e-6),
    }


def test_layout_utilities_on_four_ranks() -> None:
    for rank, checks in enumerate(run_distributed(_layout_utilities, 4, timeout=60)):
        assert all(checks.values()), f"rank {rank}: {checks}"


def _decoder_logits_and_grads(
    model, tokens: torch.Tensor, positions: torch.Tensor, logit_weights: torch.Tensor, packed_seq_params=None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(tokens, positions, attention_mask=None, packed_seq_params=packed_seq_params)
    (logits * logit_weights).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _decoder_tp2_cp2() -> dict[str, float]:
    """Logits and gradients of the tiny decoder at TP=2 x CP=2 (ring) vs TP=2 x CP=1 (local)."""
    from megatron.core import parallel_state

    from megatron_longvita.config.parallel import ParallelConfig
    from megatron_longvita.models.decoder import build_decoder
    from megatron_longvita.parallel import zigzag_split
    from megatron_longvita.parallel.attention import packed_seq_params_for_context_parallel
    from megatron_longvita.platform import initialize_distributed
    from megatron_longvita.training.synthetic import TINY_DECODER

    seq, batch = 32, 2
    generator = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, TINY_DECODER.vocab_size, (batch, seq), generator=generator)
    positions = torch.arange(seq).expand(batch, -1).contiguous()
    cu_seqlens = torch.tensor([0, 1, 14, 15, 27, 32], dtype=torch.int32)  # for the packed-documents check
    vocab = TINY_DECODER.padded_vocab_size(2)
    weights = torch.randn(batch, seq, vocab, generator=generator)

    reference = ParallelConfig(tensor_model_parallel_size=2)
    initialize_distributed(reference)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    weights = weights.chunk(2, dim=-1)[tp_rank]  # this TP rank's vocab shard
    # use_cpu_initialization draws full weights from the default CPU generator, then TP-splits
    torch.manual_seed(5)
    local_model = build_decoder(TINY_DECODER, TINY_DECODER.transformer_config(reference), layer_spec="local")
    ref_logits, ref_grads = _decoder_logits_and_grads(local_model, tokens, positions, weights)
    ring_model = build_decoder(TINY_DECODER, TINY_DECODER.transformer_config(reference), layer_spec="local_ring")
    ring_model.load_state_dict(local_model.state_dict())
    ref_doc_logits, _ = _decoder_logits_and_grads(
        ring_model, tokens[:1], positions[:1], weights[:1], packed_seq_params_for_context_parallel(cu_seqlens, seq)
    )
    ref_params = {name: p.detach().clone() for name, p in local_model.named_parameters()}

    parallel = ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2)
    initialize_distributed(parallel)
    cp_group = parallel_state.get_context_parallel_group()
    split = lambda t: zigzag_split(t, 1, 2, cp_group.rank())  # noqa: E731
    torch.manual_seed(5)
    model = build_decoder(TINY_DECODER, TINY_DECODER.transformer_config(parallel), layer_spec="local_ring")
    same_init = all(torch.equal(p, ref_params[name]) for name, p in model.named_parameters())
    # megatron's RoPE slicing runs through the declared cpu-rope-cp-split patch (patches/cpu.py)
    logits, grads = _decoder_logits_and_grads(model, split(tokens), split(positions), split(weights))
    doc_logits, _ = _decoder_logits_and_grads(
        model,
        split(tokens[:1]),
        split(positions[:1]),
        split(weights[:1]),
        packed_seq_params_for_context_parallel(cu_seqlens, seq),
    )
    for grad in grads.values():  # each CP rank holds its tokens' share of every gradient
        dist.all_reduce(grad, group=cp_group)
    return {
        "same_init": float(same_init),
        "logits": (logits - split(ref_logits)).abs().max().item(),
        # fp32 sums over b x s x vocab make gradients O(10-100): compare relative to each one's scale
        "grads": max(
            ((grads[name] - ref_grads[name]).abs().max() / ref_grads[name].abs().max()).item() for name in ref_grads
        ),
        "document_logits": (doc_logits - split(ref_doc_logits)).abs().max().item(),
        "documents_change_logits": (ref_doc_logits - ref_logits[:1]).abs().max().item(),
    }


def test_decoder_tp2_cp2_matches_cp1() -> None:
    for rank, result in enumerate(run_distributed(_decoder_tp2_cp2, 4, timeout=120)):
        assert result["same_init"] == 1.0, f"rank {rank}: CP changed the weight initialisation"
        assert result["logits"] < 1e-5 and result["grads"] < 1e-5, f"rank {rank}: {result}"
        assert result["document_logits"] < 1e-5, f"rank {rank}: {result}"
        assert result["documents_change_logits"] > 1e-2, f"rank {rank}: document masking had no effect"
