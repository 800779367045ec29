"""Output heads on plain torch ops (one process): every head gives the full head's loss,
gradients and logits; the chunked head bounds peak memory; configs fail clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_longvita.models.heads import OUTPUT_HEADS, HeadConfig, MaskedHead, VocabProjection
from megatron_longvita.registry import UnknownNameError
from tests.references import LiveTensorBytes

TOKENS, HIDDEN, VOCAB, CHUNK = 37, 8, 50, 8
# spans at both sequence borders, across chunk borders (8, 16) and single tokens
SPANS = [(0, 2), (7, 9), (15, 17), (22, 23), (30, 37)]


def _problem(dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator, dtype=dtype)
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator, dtype=dtype)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=generator)
    loss_mask = torch.zeros(TOKENS, dtype=dtype)
    for start, end in SPANS:
        loss_mask[start:end] = 1.0
    return weight, hidden, labels, loss_mask


def _plain_vocab(weight: torch.Tensor) -> VocabProjection:
    return VocabProjection(
        lambda hidden: F.linear(hidden, weight),
        lambda logits, labels: F.cross_entropy(logits, labels, reduction="none"),
    )


def _loss_and_grads(name: str, chunk_size):
    weight, hidden, labels, loss_mask = _problem()
    weight.requires_grad_()
    hidden.requires_grad_()
    per_token = OUTPUT_HEADS.get(name)(chunk_size).loss(hidden, labels, loss_mask, _plain_vocab(weight))
    loss = (per_token * loss_mask).sum() / loss_mask.sum()
    loss.backward()
    return per_token * loss_mask, weight.grad, hidden.grad


@pytest.mark.parametrize("name, chunk_size", [("chunked", CHUNK), ("masked", None), ("masked", 3)])
def test_head_matches_full_head(name: str, chunk_size) -> None:
    expected = _loss_and_grads("full", None)
    for label, got, want in zip(
        ("per-token loss", "weight grad", "hidden grad"), _loss_and_grads(name, chunk_size), expected
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{name}: {label}")


def test_masked_head_leaves_unlabelled_positions_at_zero() -> None:
    weight, hidden, labels, loss_mask = _problem()
    per_token = MaskedHead().loss(hidden, labels, loss_mask, _plain_vocab(weight))
    assert per_token[loss_mask == 0].abs().max() == 0 and per_token[loss_mask == 1].min() > 0


def test_logits_of_selected_rows_agree() -> None:
    weight, hidden, _, _ = _problem()
    rows = torch.tensor([36, 0, 9, 8])  # unsorted, chunk borders, last position
    expected = F.linear(hidden, weight)[rows]
    for name in OUTPUT_HEADS:
        torch.testing.assert_close(
            OUTPUT_HEADS.get(name)(CHUNK).logits(hidden, rows, _plain_vocab(weight)),
            expected,
            rtol=0,
            atol=1e-12,
            msg=name,
        )


def _training_peak(name: str, tokens: int, vocab: int, chunk_size) -> int:
    weight = torch.randn(vocab, 16, requires_grad=True)
    hidden = torch.randn(tokens, 16, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    loss_mask = torch.ones(tokens)
    with LiveTensorBytes((weight, hidden, labels, loss_mask)) as tracker:
        OUTPUT_HEADS.get(name)(chunk_size).loss(hidden, labels, loss_mask, _plain_vocab(weight)).sum().backward()
    return tracker.peak


def test_chunked_head_bounds_peak_memory() -> None:
    tokens, vocab, chunk = 1024, 2000, 64
    logits_bytes, chunk_bytes = tokens * vocab * 4, chunk * vocab * 4
    full = _training_peak("full", tokens, vocab, None)
    chunked = _training_peak("chunked", tokens, vocab, chunk)
    assert full >= logits_bytes
    # a few chunks of logits (logits, softmax, their grads) + dW, not tokens x vocab
    assert chunked <= 4 * chunk_bytes + 2 * vocab * 16 * 4 + tokens * 16 * 8, (full, chunked)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="sparse"), "unknown output head 'sparse'; registered: chunked, full, masked"),
        (dict(mode="chunked"), "needs --lm-head-chunk-size"),
        (dict(mode="masked", chunk_size=0), "--lm-head-chunk-size must be >= 1"),
    ],
)
def test_head_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, UnknownNameError), match=message):
        HeadConfig(**kwargs)


def test_masked_head_needs_loss_mask() -> None:
    weight, hidden, labels, _ = _problem()
    with pytest.raises(ValueError, match="needs loss_mask"):
        MaskedHead().loss(hidden, labels, None, _plain_vocab(weight))
