"""Core attention of the inference engine: the "local_ring_cached" decoder layer spec.

Without a bound :class:`KVCache` it is ring attention (training, the fixed-length re-prefill).
With one, prefill runs ring attention over the zigzag layout and keeps each layer's K/V
where they were computed; decode attends the new token's query to this rank's shard and
merges the partial results across the CP group through their log-sum-exp. Every CP rank
runs the decode step on the same token (the layers outside attention are replicated), and
only the rank chosen for this step stores the new K/V.
"""

from __future__ import annotations

from typing import Iterable, Optional

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import ModuleSpec, TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor

from megatron_longvita.inference.cache import KVCache
from megatron_longvita.models.specs import DECODER_LAYER_SPECS, local_ring_decoder_layer_spec
from megatron_longvita.parallel.attention import RingDotProductAttention
from megatron_longvita.parallel.decode import attend_cached, merge_over_group

CACHED_LAYER_SPEC = "local_ring_cached"


class CachedRingAttention(RingDotProductAttention):
    def __init__(self, config: TransformerConfig, layer_number: int, *args, **kwargs) -> None:
        super().__init__(config, layer_number, *args, **kwargs)
        self.layer_index = layer_number - 1  # global layer number; the engine caches only without PP
        self.cache: Optional[KVCache] = None

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> Tensor:
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
        out, lse = attend_cached(query.permute(1, 2, 0, 3), kv.key, kv.value, cache.attended_lengths(),
                                 self.softmax_scale)
        out = merge_over_group(out, lse, self.cp_group)  # [b, hq, 1, d]
        return out.to(query.dtype).permute(2, 0, 1, 3).flatten(2)


def bind_cache(modules: Iterable[CachedRingAttention], cache: Optional[KVCache]) -> None:
    """Point the cached attention modules at ``cache``; None makes them plain ring attention."""
    for module in modules:
        module.cache = cache


@DECODER_LAYER_SPECS.register(CACHED_LAYER_SPEC)
def local_ring_cached_decoder_layer_spec(config: TransformerConfig) -> ModuleSpec:
    spec = local_ring_decoder_layer_spec(config)
    spec.submodules.self_attention.submodules.core_attention = CachedRingAttention
    return spec
