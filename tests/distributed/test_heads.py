"""Chunked and logits-masked heads give megatron's GPTModel loss, every parameter gradient and
next-token logits, under TP=1/2, TP=2 + SP, CP=2 (ring attention) and PP=2.

One 2-rank run covers every layout (each costs a re-initialisation, not a process start); the
test body is parametrised over the layouts. Training runs through megatron's schedule with
two micro-batches whose labelled spans sit at the packed-sequence borders, across the CP
chunk borders and, in the second micro-batch, only on CP rank 1 (rank 0 selects nothing).
Gradients are compared per rank before any reduction: the heads change nothing else.
"""

from __future__ import annotations

import functools

import pytest
import torch

from megatron_longvita.config.parallel import ParallelConfig
from megatron_longvita.models.heads import HeadConfig
from tests.harness import run_distributed

SEQ, MICRO_BATCH = 32, 2  # CP=2: four zigzag chunks of 8; rank 0 holds 0-7 and 24-31
# per micro-batch, per row: labelled [start, end) spans
SPANS = [
    [[(0, 2), (7, 9), (15, 17), (23, 25), (30, 32)], [(5, 12)]],
    [[(16, 17)], [(8, 16)]],
]
LOGITS_INDEX = [31, 17]  # the last position; a position in CP rank 1's second chunk
LAYOUTS = {
    "tp1": ParallelConfig(),
    "tp2": ParallelConfig(tensor_model_parallel_size=2),
    "tp2-sp": ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
    "cp2": ParallelConfig(context_parallel_size=2),
    "pp2": ParallelConfig(pipeline_model_parallel_size=2),
}
HEADS = {
    "full": HeadConfig(mode="full", inference_mode="full"),
    "chunked": HeadConfig(mode="chunked", chunk_size=5, inference_mode="chunked"),
    "masked": HeadConfig(mode="masked"),
    "masked-chunked": HeadConfig(mode="masked", chunk_size=3),
}
TOLERANCE = 1e-5


def _microbatches(vocab_size: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    batches = []
    for spans in SPANS:
        loss_mask = torch.zeros(MICRO_BATCH, SEQ)
        for row, row_spans in enumerate(spans):
            for start, end in row_spans:
                loss_mask[row, start:end] = 1.0
        batches.append(
            {
                "tokens": torch.randint(0, vocab_size, (MICRO_BATCH, SEQ), generator=generator),
                "labels": torch.randint(0, vocab_size, (MICRO_BATCH, SEQ), generator=generator),
                "loss_mask": loss_mask,
                "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, -1).contiguous(),
            }
        )
    return batches


def _forward_step(data_iterator, model):
    from megatron_longvita.training.loop import masked_loss

    batch = next(data_iterator)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        attention_mask=None,
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )
    return output, functools.partial(masked_loss, batch["loss_mask"])


def _train(chunks, batches) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    reports = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(batches),
        model=chunks,
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    grads = {name: p.grad.clone() for chunk in chunks for name, p in chunk.named_parameters()}
    return [report["lm loss"] for report in reports], grads


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def _compare_layout(parallel: ParallelConfig) -> dict[str, dict[str, float]]:
    from megatron.core import parallel_state

    from megatron_longvita.models.decoder import build_decoder
    from megatron_longvita.parallel import split_batch_for_context_parallel, zigzag_gather
    from megatron_longvita.platform import initialize_distributed
    from megatron_longvita.training.loop import build_model_chunks
    from megatron_longvita.training.synthetic import TINY_DECODER

    initialize_distributed(parallel)
    config = TINY_DECODER.transformer_config(parallel)
    cp_group = parallel_state.get_context_parallel_group()
    batches = [
        split_batch_for_context_parallel(batch, cp_group.size(), cp_group.rank())
        for batch in _microbatches(TINY_DECODER.vocab_size)
    ]
    last_stage = parallel_state.is_pipeline_last_stage()

    torch.manual_seed(5)
    reference = build_model_chunks(functools.partial(build_decoder, TINY_DECODER, config))
    ref_losses, ref_grads = _train(reference, batches)
    inference = parallel.pipeline_model_parallel_size == 1
    if inference:
        tokens, positions = batches[0]["tokens"], batches[0]["position_ids"]
        with torch.no_grad():
            ref_logits = (
                zigzag_gather(reference[0](tokens, positions, attention_mask=None), 1, cp_group)
                if cp_group.size() > 1
                else reference[0](tokens, positions, attention_mask=None)
            )
        expected_logits = ref_logits[torch.arange(MICRO_BATCH), torch.tensor(LOGITS_INDEX)][:, None]

    errors = {}
    for name, head in HEADS.items():
        chunks = build_model_chunks(functools.partial(build_decoder, TINY_DECODER, config, head=head))
        for chunk, ref in zip(chunks, reference):
            chunk.load_state_dict(ref.state_dict())
        losses, grads = _train(chunks, batches)
        result = {"grads": max(_relative_error(grads[key], ref_grads[key]) for key in ref_grads)}
        if last_stage:
            result["loss_sum"] = max(_relative_error(got[0], want[0]) for got, want in zip(losses, ref_losses))
            result["token_count"] = max(abs(got[1] - want[1]).item() for got, want in zip(losses, ref_losses))
        if inference:
            with torch.no_grad():
                logits = chunks[0](tokens, positions, attention_mask=None, logits_index=torch.tensor(LOGITS_INDEX))
            result["logits"] = _relative_error(logits, expected_logits)
        errors[name] = result
    return errors


def _compare_all_layouts() -> dict[str, dict[str, dict[str, float]]]:
    return {layout: _compare_layout(parallel) for layout, parallel in LAYOUTS.items()}


@pytest.fixture(scope="module")
def errors_per_rank() -> list[dict]:
    return run_distributed(_compare_all_layouts, 2, timeout=240)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_heads_match_megatron_head(layout: str, errors_per_rank: list[dict]) -> None:
    for rank, per_layout in enumerate(errors_per_rank):
        for head, errors in per_layout[layout].items():
            assert errors.get("token_count", 0) == 0, f"{layout} rank {rank} {head}: {errors}"
            assert max(errors.values()) <= TOLERANCE, f"{layout} rank {rank} {head}: {errors}"
