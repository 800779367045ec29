"""Ring attention as megatron's core attention (the "local_ring" and "local_ring_cached" specs).

Drop-in for ``DotProductAttention`` in a local layer spec: same constructor and forward
signature (upstream contract "dot-product-attention-signature"; the block ``kernel`` is the
platform's, bound by the spec with ``functools.partial``), q/k/v [s, b, heads, head_dim]
with heads already split by TP, output [s, b, heads * head_dim]. The CP group comes from
megatron's parallel_state; at CP=1 it is plain (optionally document-masked) causal
attention, which the local spec lacks too.

Packed documents arrive as ``PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=...)`` with
global boundaries of the padded sequence (:func:`packed_seq_params_for_context_parallel`).
RoPE needs no per-document restart: with attention confined to a document, a score
depends only on the distance between query and key, which global positions preserve.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_longvita.parallel.cache import KVCache
from megatron_longvita.parallel.decode import attend_cached, merge_over_group
from megatron_longvita.parallel.ring import ring_attention
from megatron_longvita.patches.contracts import DOT_PRODUCT_ATTENTION, require


def packed_seq_params_for_context_parallel(cu_seqlens: Tensor, total_length: int) -> PackedSeqParams:
    """Document boundaries for ring attention, on the whole padded sequence.

    ``max_seqlen`` is the total length on purpose: megatron sizes its RoPE table from it
    before cutting the table into the zigzag shares.
    """
    return PackedSeqParams(
        qkv_format="sbhd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=total_length,
        max_seqlen_kv=total_length,
    )


class RingDotProductAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        *,
        kernel: str,
    ) -> None:
        require(DOT_PRODUCT_ATTENTION.name)
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"ring attention is causal-only (decoder self-attention), got {attn_mask_type}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"ring attention has no attention dropout, got {dropout}")
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise ValueError("ring attention supports vanilla softmax without sliding windows only")
        # apply_query_key_layer_scaling divides then re-multiplies by the layer number (an fp16
        # overflow guard): the net scale, used here in fp32, is unchanged.
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.kv_channels**-0.5
        self.kernel = kernel  # a BLOCK_KERNELS name: Platform.attention_kernel
        cp_group = getattr(pg_collection, "cp", None)
        self.cp_group = cp_group if cp_group is not None else parallel_state.get_context_parallel_group()

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        # attention_mask is megatron's default causal mask (or None): the causal rule is built in.
        if attention_bias is not None:
            raise ValueError("ring attention does not take an attention bias")
        cu_seqlens = None
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "sbhd" or not torch.equal(
                packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
            ):
                raise ValueError(
                    "ring attention takes packed documents as qkv_format='sbhd' with equal "
                    "cu_seqlens_q/kv (see packed_seq_params_for_context_parallel)"
                )
            cu_seqlens = packed_seq_params.cu_seqlens_q
        out = ring_attention(
            query,
            key,
            value,
            self.cp_group,
            cu_seqlens=cu_seqlens,
            softmax_scale=self.softmax_scale,
            kernel=self.kernel,
        )
        return out.flatten(2)


class CachedRingAttention(RingDotProductAttention):
    """The inference engine's core attention.

    Without a bound :class:`KVCache` it is ring attention (training, the fixed-length re-prefill).
    With one, prefill runs ring attention over the zigzag layout and keeps each layer's K/V
    where they were computed; decode attends the new token's query to this rank's shard and
    merges the partial results across the CP group through their log-sum-exp. Every CP rank
    runs the decode step on the same token (the layers outside attention are replicated), and
    only the rank chosen for this step stores the new K/V.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, *args, **kwargs) -> None:
        super().__init__(config, layer_number, *args, **kwargs)
        self.layer_index = layer_number - 1  # global layer number; the engine caches only without PP
        self.cache: Optional[KVCache] = None

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        cache = self.cache
        if cache is not None and cache.decoding:
            return self._decode(query, key, value, cache)
        if cache is not None:
            cache.store_prefill(self.layer_index, key, value)
        return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)

    def _decode(self, query: Tensor, key: Tensor, value: Tensor, cache: KVCache) -> Tensor:
        """query/key/value [1, b, heads, d] of the new token -> [1, b, hq * d]."""
        if cache.appending:
            cache.append(self.layer_index, key, value)
        kv = cache.layers[self.layer_index]
        out, lse = attend_cached(
            query.permute(1, 2, 0, 3), kv.key, kv.value, cache.attended_lengths(), self.softmax_scale
        )
        out = merge_over_group(out, lse, self.cp_group)  # [b, hq, 1, d]
        return out.to(query.dtype).permute(2, 0, 1, 3).flatten(2)


def bind_cache(modules: Iterable[CachedRingAttention], cache: Optional[KVCache]) -> None:
    """Point the cached attention modules at ``cache``; None makes them plain ring attention."""
    for module in modules:
        module.cache = cache
