"""Ring attention as megatron's core attention (the "local_ring" decoder layer spec).

Drop-in for ``DotProductAttention`` in a local layer spec: same constructor and forward
signature, q/k/v [s, b, heads, head_dim] with heads already split by TP, output
[s, b, heads * head_dim]. The CP group comes from megatron's parallel_state; at CP=1 it is
plain (optionally document-masked) causal attention, which the local spec lacks too.

Packed documents arrive as ``PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=...)`` with
global boundaries of the padded sequence (:func:`packed_seq_params_for_context_parallel`).
RoPE needs no per-document restart: with attention confined to a document, a score
depends only on the distance between query and key, which global positions preserve.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_longvita.parallel.ring import ring_attention


def packed_seq_params_for_context_parallel(cu_seqlens: Tensor, total_length: int) -> PackedSeqParams:
    """Document boundaries for ring attention, on the whole padded sequence.

    ``max_seqlen`` is the total length on purpose: megatron sizes its RoPE table from it
    before cutting the table into the zigzag shares.
    """
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=total_length, max_seqlen_kv=total_length)


class RingDotProductAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None) -> None:
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
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.kv_channels ** -0.5
        cp_group = getattr(pg_collection, "cp", None)
        self.cp_group = cp_group if cp_group is not None else parallel_state.get_context_parallel_group()

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> Tensor:
        # attention_mask is megatron's default causal mask (or None): the causal rule is built in.
        if attention_bias is not None:
            raise ValueError("ring attention does not take an attention bias")
        cu_seqlens = None
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "sbhd" or not torch.equal(packed_seq_params.cu_seqlens_q,
                                                                         packed_seq_params.cu_seqlens_kv):
                raise ValueError("ring attention takes packed documents as qkv_format='sbhd' with equal "
                                 "cu_seqlens_q/kv (see packed_seq_params_for_context_parallel)")
            cu_seqlens = packed_seq_params.cu_seqlens_q
        out = ring_attention(query, key, value, self.cp_group, cu_seqlens=cu_seqlens,
                             softmax_scale=self.softmax_scale)
        return out.flatten(2)
