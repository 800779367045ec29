"""Context parallelism without Transformer Engine: zigzag layout + ring attention.

One ring algorithm (:mod:`.ring`) over pluggable block kernels (:mod:`.kernels`, keyed by
``Platform.attention_kernel``); :mod:`.zigzag` splits micro-batches and gathers outputs;
:mod:`.attention` holds the megatron core-attention modules behind the "local_ring" and
"local_ring_cached" specs; :mod:`.cache` and :mod:`.decode` are the KV cache sharded over
CP and the decode step's attention against it; the merge of partial attentions is
:func:`.kernels.merge_partial_attention` (in place: ``merge_partial_attention_``, the ring's).
"""

from megatron_longvita.parallel.kernels import BLOCK_KERNELS, BlockKernel, Segment
from megatron_longvita.parallel.ring import RingStep, plan_ring, ring_attention
from megatron_longvita.parallel.zigzag import (
    ContextParallelLayoutError,
    pad_for_context_parallel,
    split_batch_for_context_parallel,
    zigzag_gather,
    zigzag_positions,
    zigzag_split,
)

__all__ = [
    "BLOCK_KERNELS",
    "BlockKernel",
    "Segment",
    "RingStep",
    "plan_ring",
    "ring_attention",
    "ContextParallelLayoutError",
    "pad_for_context_parallel",
    "split_batch_for_context_parallel",
    "zigzag_gather",
    "zigzag_positions",
    "zigzag_split",
]
