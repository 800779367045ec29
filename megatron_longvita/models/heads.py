"""Output heads: the output layer + vocab-parallel cross-entropy, full, chunked or logits-masked.

A 152K-vocabulary output layer materialises a [tokens x vocab] fp32 matrix: 608 GB at 1M
tokens. The logits-masked head (paper section 3.4) feeds only the hidden states that need a
prediction to the output layer: the labelled positions in training and the next-token
position of each sequence at inference. Labels are already shifted per sample
(docs/design.md, "Packing"), so the training positions are exactly those with
``loss_mask != 0``, each context-parallel rank selecting from its own zigzag chunks; no
target is lost at sample or chunk borders. The chunked head (the paper's baseline) computes every position, one chunk
of logits at a time, recomputing the chunk in backward so that only one chunk of logits is
ever alive.

Every head gives the same per-token loss at labelled positions, so megatron's schedules and
the 3-tuple loss function (``training.loop.masked_loss``) work unchanged with any of
them. Heads see token-major, full-sequence (not sequence-parallel) hidden states [n, h];
:class:`HeadedGPTModel` does the layout work (SP gather, CP positions, [s, b] <-> tokens).

Training flags, mapped onto :class:`HeadConfig` by the training driver: ``--lm-head NAME``
(mode: any name in OUTPUT_HEADS, a plugin's included), ``--logits-mask`` (mode="masked"),
``--lm-head-chunk-size N`` (chunk_size, given to every head but "full": the masked head
chunks its selected tokens).
Inference always uses ``inference_mode`` (default "masked": the next-token position only);
``HeadConfig(inference_mode="full")`` computes every position, there is no flag for it.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import (
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    linear_with_grad_accumulation_and_async_allreduce,
)
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from megatron_longvita.parallel import zigzag_positions
from megatron_longvita.patches.contracts import GPT_POSTPROCESS, require
from megatron_longvita.registry import OUTPUT_HEADS


@dataclass(frozen=True)
class VocabProjection:
    """The output layer as two token-major functions."""

    project: Callable[[Tensor], Tensor]  # hidden [n, h] -> vocab-parallel logits [n, V / TP]
    cross_entropy: Callable[[Tensor, Tensor], Tensor]  # (logits [n, V / TP], labels [n]) -> loss [n]

    def loss(self, hidden: Tensor, labels: Tensor) -> Tensor:
        return self.cross_entropy(self.project(hidden), labels)


class OutputHead(ABC):
    def __init__(self, chunk_size: Optional[int] = None) -> None:
        self.chunk_size = chunk_size

    @abstractmethod
    def loss(self, hidden: Tensor, labels: Tensor, loss_mask: Optional[Tensor], vocab: VocabProjection) -> Tensor:
        """Per-token loss [n] of hidden [n, h] and labels [n]; exact wherever ``loss_mask != 0``."""

    @abstractmethod
    def logits(self, hidden: Tensor, rows: Tensor, vocab: VocabProjection) -> Tensor:
        """Vocab-parallel logits [len(rows), V / TP] of the tokens ``rows`` of hidden [n, h]."""


# OUTPUT_HEADS (megatron_longvita.registry): name -> OutputHead class, constructed with HeadConfig.chunk_size


@OUTPUT_HEADS.register("full")
class FullHead(OutputHead):
    """Megatron's head: logits for every position (the reference)."""

    def loss(self, hidden: Tensor, labels: Tensor, loss_mask: Optional[Tensor], vocab: VocabProjection) -> Tensor:
        return vocab.loss(hidden, labels)

    def logits(self, hidden: Tensor, rows: Tensor, vocab: VocabProjection) -> Tensor:
        return vocab.project(hidden)[rows]


@OUTPUT_HEADS.register("chunked")
class ChunkedHead(OutputHead):
    """Every position, ``chunk_size`` tokens of logits at a time, forward and backward."""

    def loss(self, hidden: Tensor, labels: Tensor, loss_mask: Optional[Tensor], vocab: VocabProjection) -> Tensor:
        return chunked_loss(hidden, labels, vocab, self.chunk_size)

    def logits(self, hidden: Tensor, rows: Tensor, vocab: VocabProjection) -> Tensor:
        sorted_rows, order = rows.sort()
        kept = []
        for start, chunk in zip(range(0, hidden.shape[0], self.chunk_size), hidden.split(self.chunk_size)):
            inside = sorted_rows[(sorted_rows >= start) & (sorted_rows < start + chunk.shape[0])]
            # the full-length baseline computes every position; one chunk of logits alive at a time
            kept.append(vocab.project(chunk)[inside - start])
        out = torch.cat(kept)
        return torch.empty_like(out).index_copy_(0, order, out)


@OUTPUT_HEADS.register("masked")
class MaskedHead(OutputHead):
    """Only the positions that need a prediction reach the output layer (chunked if chunk_size)."""

    def loss(self, hidden: Tensor, labels: Tensor, loss_mask: Optional[Tensor], vocab: VocabProjection) -> Tensor:
        if loss_mask is None:
            raise ValueError("the logits-masked head needs loss_mask: pass loss_mask= to the model's forward")
        rows = loss_mask.nonzero().squeeze(1)
        selected = chunked_loss(hidden.index_select(0, rows), labels.index_select(0, rows), vocab, self.chunk_size)
        # zeros elsewhere; the gradient flows back to the selected hidden states only
        return selected.new_zeros(hidden.shape[0]).index_copy(0, rows, selected)

    def logits(self, hidden: Tensor, rows: Tensor, vocab: VocabProjection) -> Tensor:
        return vocab.project(hidden.index_select(0, rows))


def chunked_loss(hidden: Tensor, labels: Tensor, vocab: VocabProjection, chunk_size: Optional[int]) -> Tensor:
    """``vocab.loss`` in chunks of ``chunk_size`` tokens (all at once if None).

    Each chunk is checkpointed: its logits are freed after the forward and recomputed in the
    backward, and autograd finishes one chunk's backward before starting the next, so at most
    one chunk of logits (and of their gradient) is alive.
    """
    if chunk_size is None or hidden.shape[0] <= chunk_size:
        return vocab.loss(hidden, labels)
    return torch.cat(
        [
            # no randomness in the head: skip the RNG-state stashing
            checkpoint(vocab.loss, hidden_chunk, label_chunk, use_reentrant=False, preserve_rng_state=False)
            for hidden_chunk, label_chunk in zip(hidden.split(chunk_size), labels.split(chunk_size))
        ]
    )


@dataclass(frozen=True)
class HeadConfig:
    """Which output head computes the training loss and the inference logits."""

    mode: str = "full"  # training: a name in OUTPUT_HEADS ("full" | "chunked" | "masked")
    chunk_size: Optional[int] = None  # tokens per chunk: required by "chunked", optional for "masked"
    inference_mode: str = "masked"  # next-token logits at inference: on by default

    def __post_init__(self) -> None:
        for name in (self.mode, self.inference_mode):
            OUTPUT_HEADS.get(name)  # an unknown name fails with the registered ones
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"--lm-head-chunk-size must be >= 1, got {self.chunk_size}")
        if "chunked" in (self.mode, self.inference_mode) and self.chunk_size is None:
            raise ValueError("the chunked head needs --lm-head-chunk-size (HeadConfig.chunk_size)")

    def build(self, name: str) -> OutputHead:
        return OUTPUT_HEADS.get(name)(self.chunk_size)


class HeadedGPTModel(GPTModel):
    """megatron's GPTModel with the last stage's logits and loss computed by configured heads.

    ``forward`` is GPTModel's, with two differences on the last pipeline stage:

    - with ``labels``: the per-token loss [b, s] of ``head.mode`` (zero where the masked head
      skipped a position). The masked head needs ``loss_mask=`` ([b, s], labels' layout).
    - with ``logits_index`` and no labels: logits [b, 1, V] (V / TP unless gathered, as
      GPTModel's logits) predicting the token after global position ``logits_index[i]`` of
      row i (the full, un-split sequence; e.g. each prompt's last real token). Under CP only
      the rank holding a position computes its logits, then every CP rank gets all rows.
      Not differentiable across CP ranks: for inference.

    Without either, or with megatron's own ``inference_context``, it is GPTModel. Overrides
    the private ``GPTModel._postprocess`` (upstream contract "gpt-model-postprocess").
    """

    def __init__(self, *args, head: HeadConfig = HeadConfig(), **kwargs) -> None:
        require(GPT_POSTPROCESS.name)
        super().__init__(*args, **kwargs)
        if self.config.mtp_num_layers:
            raise ValueError("output heads do not support multi-token prediction (mtp_num_layers)")
        self.train_head = head.build(head.mode)
        self.inference_head = head.build(head.inference_mode)
        self._logits_index: Optional[Tensor] = None

    def forward(self, *args, logits_index: Union[Tensor, int, None] = None, **kwargs) -> Tensor:
        # GPTModel.forward passes a fixed set of arguments to _postprocess: hand this one over here.
        self._logits_index = None if logits_index is None else torch.as_tensor(logits_index)
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._logits_index = None

    def _postprocess(
        self,
        hidden_states: Tensor,
        labels: Optional[Tensor] = None,
        loss_mask: Optional[Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
        inference_context=None,
        **kwargs,
    ) -> Tensor:
        if not self.post_process or inference_context is not None or (labels is None and self._logits_index is None):
            return super()._postprocess(
                hidden_states=hidden_states,
                labels=labels,
                loss_mask=loss_mask,
                runtime_gather_output=runtime_gather_output,
                inference_context=inference_context,
                **kwargs,
            )
        hidden = self._full_sequence(hidden_states)
        seq, batch, _ = hidden.shape
        tokens = hidden.reshape(seq * batch, -1)  # token-major: row = position * batch + sample
        vocab = self._vocab_projection()
        if labels is not None:
            mask = None if loss_mask is None else _token_major(loss_mask)
            loss = self.train_head.loss(tokens, _token_major(labels), mask, vocab)
            return loss.view(seq, batch).t().contiguous()
        gather = self.output_layer.gather_output if runtime_gather_output is None else runtime_gather_output
        return self._next_token_logits(tokens, seq, batch, vocab, gather)

    def _full_sequence(self, hidden: Tensor) -> Tensor:
        """All of this CP rank's positions on every TP rank.

        The backward only splits: the output layer all-reduces its input gradient over TP
        (allreduce_dgrad in ``_vocab_projection``), on the selected tokens only.
        """
        if not self.output_layer.sequence_parallel:
            return hidden
        return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False, group=self.tp_group)

    def _vocab_projection(self) -> VocabProjection:
        layer = self.output_layer
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else layer.weight
        project = functools.partial(
            linear_with_grad_accumulation_and_async_allreduce,
            weight=weight,
            bias=layer.bias,
            gradient_accumulation_fusion=layer.gradient_accumulation_fusion,
            allreduce_dgrad=self.tp_group.size() > 1,
            sequence_parallel=False,
            tp_group=self.tp_group,
        )

        def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
            # megatron's loss ([b, s] labels, [s, b, V] logits) on a batch of one
            return self.compute_language_model_loss(labels[None], logits[:, None]).squeeze(0)

        return VocabProjection(project, cross_entropy)

    def _next_token_logits(self, tokens: Tensor, seq: int, batch: int, vocab: VocabProjection, gather: bool) -> Tensor:
        cp_size, cp_rank = self.cp_group.size(), self.cp_group.rank()
        index = self._logits_index.to(tokens.device).expand(batch)
        if ((index < 0) | (index >= seq * cp_size)).any():
            raise ValueError(f"logits_index {index.tolist()} outside the sequence of {seq * cp_size} positions")
        positions = (
            zigzag_positions(seq * cp_size, cp_size, cp_rank, tokens.device)
            if cp_size > 1
            else torch.arange(seq, device=tokens.device)
        )
        here = positions[None, :] == index[:, None]  # [b, s_local]: at most one True per row
        held = here.any(dim=1).nonzero().squeeze(1)
        rows = here[held].int().argmax(dim=1) * batch + held
        logits = self.inference_head.logits(tokens, rows, vocab)
        out = logits.new_zeros(batch, logits.shape[-1]).index_copy(0, held, logits)
        if cp_size > 1:
            dist.all_reduce(out, group=self.cp_group)  # each row is non-zero on its holder only
        if gather:
            out = gather_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out[:, None]


def _token_major(per_sample: Tensor) -> Tensor:
    """[b, s] -> [s * b], the order of hidden states [s, b, h] flattened."""
    return per_sample.t().reshape(-1)
