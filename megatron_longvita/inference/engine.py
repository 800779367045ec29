"""Context-parallel inference: TP+CP prefill with the masked head, decoding over a KV cache
sharded across the CP ranks.

Prefill runs the whole model once per request (vision tower included, its features
scattered into the placeholders) on the prompt padded at the end to a multiple of 2 x CP
and cut into zigzag shares; ring attention keeps each layer's K/V on the rank (and TP heads)
that computed them, and the masked head computes logits at each prompt's last real token
only. Decode feeds the sampled token to every CP rank: its query attends to each rank's
cache shard and the partial results are merged by log-sum-exp (parallel/decode.py); the
new K/V go to one rank, round-robin, so each rank's cache and per-token work grow by
N / CP. ``decode_mode="fixed-length"`` is the paper's method for comparison: a fixed
sequence of prompt + max_new_tokens, re-run whole for every token, without a cache. Under
pipeline parallelism (no CP) that is the one mode: each forward runs through megatron's
pipeline schedule and the last stage's logits are broadcast to every stage.

RoPE for a decode step: megatron's GPTModel sizes its rotary table from the input length
and cuts it into zigzag shares, which does not fit one replicated token. So decode drives
GPTModel's parts directly (embedding -> decoder block with the rotary angles of each row's
position -> output layer); prefill is the ordinary model forward.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from megatron_longvita.checkpoint.dist import load_model
from megatron_longvita.checkpoint.model_config import load_model_config
from megatron_longvita.config.parallel import ConfigError, ParallelConfig
from megatron_longvita.inference.rope import RopeScaling, apply_rope_scaling, rotary_table
from megatron_longvita.inference.sampling import Sampler, SamplingConfig
from megatron_longvita.models.heads import HeadConfig
from megatron_longvita.models.long_vita import LongVitaModel, gather_logits, long_vita_provider
from megatron_longvita.models.specs import INFERENCE
from megatron_longvita.parallel import zigzag_positions, zigzag_split
from megatron_longvita.parallel.attention import CachedRingAttention, bind_cache
from megatron_longvita.parallel.cache import KVCache
from megatron_longvita.platform import Platform
from megatron_longvita.training.loop import build_model_chunks

DECODE_MODES = ("cached", "fixed-length")


@dataclass
class GenerationRequest:
    tokens: list[int]  # expanded prompt ids (build_inference_prompt), ending where the answer starts
    pixel_values: Optional[Tensor] = None  # [n_tiles, 3, H, W] of this prompt, placeholder order


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 16
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_token_ids: tuple[int, ...] = ()  # e.g. <|im_end|>; kept as the last generated token
    decode_mode: str = "cached"
    pad_token_id: int = 0  # fills the prompt tail up to 2 x CP; causally invisible to real tokens

    def __post_init__(self) -> None:
        if self.decode_mode not in DECODE_MODES:
            raise ValueError(f"--decode-mode must be one of {DECODE_MODES}, got {self.decode_mode!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Generation:
    tokens: list[int]  # generated ids only
    first_logits: Tensor  # [vocab] fp32: the logits that chose tokens[0]


@dataclass
class Timing:
    prefill_s: float = 0.0  # the first forward (the only full one in cached mode)
    step_s: list[float] = field(default_factory=list)  # every later forward, in order

    @property
    def per_token_s(self) -> float:
        return statistics.fmean(self.step_s) if self.step_s else 0.0

    @property
    def median_token_s(self) -> float:  # robust to a busy host's stalls
        return statistics.median(self.step_s) if self.step_s else 0.0


def load_for_inference(load_dir: str, parallel: ParallelConfig, **options) -> tuple[list[MegatronModule], int]:
    """Build this rank's chunks at ``parallel`` (``options``: build_long_vita's keywords), load
    the checkpoint; returns them in eval mode and the vocabulary size."""
    config, dtype = load_model_config(load_dir)
    config.validate_parallel(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size)
    chunks = build_model_chunks(long_vita_provider(config, parallel, params_dtype=dtype, **options))
    load_model(chunks, load_dir)
    for chunk in chunks:
        chunk.eval()
    return chunks, config.decoder.vocab_size


def load_engine(
    load_dir: str,
    parallel: ParallelConfig,
    rope_scaling: Optional[RopeScaling] = None,
    platform: Optional[Platform] = None,
) -> InferenceEngine:
    """The engine on a checkpoint, at TP x CP or TP x PP (megatron's parallel state already
    initialised); ``platform``: default the detected one."""
    if parallel.sequence_parallel or parallel.virtual_pipeline_model_parallel_size is not None:
        raise ConfigError(
            "the inference engine runs without --sequence-parallel (decode steps are one token "
            "long) and without --virtual-pipeline-model-parallel-size"
        )
    if parallel.pipeline_model_parallel_size > 1 and (parallel.context_parallel_size > 1 or rope_scaling):
        raise ConfigError(
            "with --pipeline-model-parallel-size > 1 the engine runs fixed-length decoding at "
            "TP x PP only: use --pipeline-model-parallel-size 1 for --context-parallel-size and "
            "--rope-scaling"
        )
    [model], vocab_size = load_for_inference(
        load_dir, parallel, purpose=INFERENCE, head=HeadConfig(), platform=platform
    )
    return InferenceEngine(model, vocab_size, rope_scaling)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class InferenceEngine:
    def __init__(self, model: LongVitaModel, vocab_size: int, rope_scaling: Optional[RopeScaling] = None) -> None:
        self.model, self.gpt, self.vocab_size = model, model.language_model, vocab_size
        self.attention = [m for m in model.modules() if isinstance(m, CachedRingAttention)]
        self.pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
        if not self.attention or not (self.pipelined or (model.pre_process and model.post_process)):
            raise ConfigError(
                "the engine needs this rank's model (the whole model without PP) built for "
                "purpose='inference' (cached ring attention) and with a head (HeadConfig); "
                "see load_engine"
            )
        self.cp_group = parallel_state.get_context_parallel_group()
        self.cp_size, self.cp_rank = self.cp_group.size(), self.cp_group.rank()
        self.device = next(model.parameters()).device
        # vision placeholders are input-only: generated, one would be read as an image slot on re-prefill
        self.placeholder_ids = torch.tensor(model.model_config.context_token_ids, device=self.device)
        if rope_scaling is not None:
            decoder = model.model_config.decoder
            apply_rope_scaling(
                self.gpt.rotary_pos_emb,
                self.attention,
                rope_scaling,
                decoder.rotary_base,
                decoder.max_position_embeddings,
            )
        self.timing = Timing()

    def generate(
        self,
        prompts: Sequence[GenerationRequest],
        config: GenerationConfig = GenerationConfig(),
        on_tokens: Optional[Callable[[list[Optional[int]]], None]] = None,
    ) -> list[Generation]:
        """Generate for a batch of prompts; ``on_tokens`` gets each step's new id per row (None
        once a row has stopped), for streaming."""
        if not prompts or min(len(p.tokens) for p in prompts) == 0:
            raise ValueError("generate needs at least one prompt, each with at least one token")
        if self.pipelined and config.decode_mode != "fixed-length":
            raise ConfigError(
                "with --pipeline-model-parallel-size > 1 the engine decodes fixed-length only: use "
                "--decode-mode fixed-length (the KV cache needs the whole model on each rank)"
            )
        sampler = Sampler(config.sampling)
        decoding = self._cached_decoding if config.decode_mode == "cached" else self._fixed_length_decoding
        self.timing = Timing()
        generated: list[list[int]] = [[] for _ in prompts]
        with torch.inference_mode():
            try:
                start = time.perf_counter()
                logits, step = decoding(prompts, config)
                self.timing.prefill_s = time.perf_counter() - start
                first_logits = logits
                for t in range(config.max_new_tokens):
                    ids = self._choose(sampler, logits)
                    new = [None if self._stopped(row, config) else int(ids[i]) for i, row in enumerate(generated)]
                    for row, token in zip(generated, new):
                        if token is not None:
                            row.append(token)
                    if on_tokens is not None:
                        on_tokens(new)
                    if t + 1 == config.max_new_tokens or all(self._stopped(row, config) for row in generated):
                        break
                    start = time.perf_counter()
                    logits = step(ids, t)
                    self.timing.step_s.append(time.perf_counter() - start)
            finally:
                bind_cache(self.attention, None)
        return [Generation(row, first_logits[i].cpu()) for i, row in enumerate(generated)]

    @staticmethod
    def _stopped(row: list[int], config: GenerationConfig) -> bool:
        return bool(row) and row[-1] in config.stop_token_ids

    def _choose(self, sampler: Sampler, logits: Tensor) -> Tensor:
        # Every rank holds bit-identical logits (TP gathers them, the CP merge folds in rank
        # order) and a sampler seeded alike, so all ranks choose the same ids with no collective.
        return sampler(logits.index_fill(-1, self.placeholder_ids, -torch.inf))

    def _batch(
        self, prompts: Sequence[GenerationRequest], length: int, pad_id: int
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Tokens [b, length] padded at the end, prompt lengths [b], all tiles in batch order."""
        tokens = torch.full((len(prompts), length), pad_id, dtype=torch.long)
        for row, prompt in zip(tokens, prompts):
            row[: len(prompt.tokens)] = torch.tensor(prompt.tokens)
        tiles = [p.pixel_values for p in prompts if p.pixel_values is not None]
        pixel_values = torch.cat(tiles).to(self.device) if tiles else None
        lengths = torch.tensor([len(p.tokens) for p in prompts])
        return tokens.to(self.device), lengths.to(self.device), pixel_values

    def _forward(self, tokens: Tensor, lengths: Tensor, pixel_values: Optional[Tensor]) -> Tensor:
        """Full-sequence forward of tokens [b, L]: next-token logits [b, V] after position lengths - 1."""
        positions = torch.arange(tokens.shape[1], device=self.device).expand_as(tokens)
        if self.cp_size > 1:
            tokens, positions = (zigzag_split(t, 1, self.cp_size, self.cp_rank) for t in (tokens, positions))
        if self.pipelined:
            return self._pipeline_forward(tokens, positions, lengths, pixel_values)
        logits = self.model(tokens, positions, None, pixel_values=pixel_values, logits_index=lengths - 1)
        return gather_logits(logits[:, 0], self.vocab_size).float()

    def _pipeline_forward(
        self, tokens: Tensor, positions: Tensor, lengths: Tensor, pixel_values: Optional[Tensor]
    ) -> Tensor:
        """The forward through megatron's pipeline schedule (one micro-batch); every stage gets the logits."""

        def forward_step(data_iterator, model):
            next(data_iterator)  # the batch is the closure's
            return model(tokens, positions, None, pixel_values=pixel_values, logits_index=lengths - 1), None

        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([None]),
            model=[self.model],
            num_microbatches=1,
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
            forward_only=True,
        )
        logits = torch.empty(tokens.shape[0], self.vocab_size, dtype=torch.float32, device=self.device)
        if parallel_state.is_pipeline_last_stage():
            logits = gather_logits(outputs[0][:, 0], self.vocab_size).float()
        dist.broadcast(
            logits,
            parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        return logits

    def _cached_decoding(self, prompts: Sequence[GenerationRequest], config: GenerationConfig):
        """Prefill (filling the cache); returns the first logits and the decode step."""
        length = _round_up(max(len(p.tokens) for p in prompts), 2 * self.cp_size)
        tokens, lengths, pixel_values = self._batch(prompts, length, config.pad_token_id)
        local_positions = zigzag_positions(length, self.cp_size, self.cp_rank, self.device)
        cache = KVCache(
            capacity=length // self.cp_size + math.ceil(config.max_new_tokens / self.cp_size),
            lengths=(local_positions[None, :] < lengths[:, None]).sum(1).tolist(),
        )
        bind_cache(self.attention, cache)
        logits = self._forward(tokens, lengths, pixel_values)
        cache.decoding = True
        angles = rotary_table(self.gpt.rotary_pos_emb, int(lengths.max()) + config.max_new_tokens)

        def step(ids: Tensor, t: int) -> Tensor:
            cache.appending = t % self.cp_size == self.cp_rank  # round-robin: each rank gets 1/CP of the tokens
            logits = self._decode(ids, lengths + t, angles)
            cache.finish_step()
            return logits

        return logits, step

    def _decode(self, ids: Tensor, positions: Tensor, angles: Tensor) -> Tensor:
        """One token per row at ``positions`` [b] through embedding, decoder and output layer."""
        hidden = self.gpt.embedding(input_ids=ids[:, None], position_ids=positions[:, None])  # [1, b, h]
        hidden = self.gpt.decoder(
            hidden_states=hidden, attention_mask=None, rotary_pos_emb=angles[positions][None, :, None, :]
        )
        weight = self.gpt.shared_embedding_or_output_weight() if self.gpt.share_embeddings_and_output_weights else None
        logits, _ = self.gpt.output_layer(hidden, weight=weight)
        return gather_logits(logits[0], self.vocab_size).float()

    def _fixed_length_decoding(self, prompts: Sequence[GenerationRequest], config: GenerationConfig):
        """The paper's method: one fixed length for the request, the whole forward per token."""
        length = _round_up(max(len(p.tokens) for p in prompts) + config.max_new_tokens, 2 * self.cp_size)
        tokens, lengths, pixel_values = self._batch(prompts, length, config.pad_token_id)
        rows = torch.arange(len(prompts), device=self.device)

        def step(ids: Tensor, t: int) -> Tensor:
            tokens[rows, lengths + t] = ids
            return self._forward(tokens, lengths + t + 1, pixel_values)

        return self._forward(tokens, lengths, pixel_values), step
