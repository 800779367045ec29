"""Context parallelism without Transformer Engine: zigzag layout + ring attention.

One ring algorithm (:mod:`.ring`) over pluggable block kernels (:mod:`.kernels`, keyed by
``Platform.attention_kernel``); :mod:`.zigzag` splits micro-batches and gathers outputs;
:mod:`.attention` is the megatron core-attention module behind the "local_ring" spec.
"""

from megatron_longvita.parallel.kernels import BLOCK_KERNELS, BlockKernel, Segment
from megatron_longvita.parallel.ring import RingStep, plan_ring, ring_attention
from megatron_longvita.parallel.zigzag import (
    ContextParallelLayoutError,
    context_parallel_loss,
    pad_for_context_parallel,
    split_batch_for_context_parallel,
    zigzag_gather,
    zigzag_positions,
    zigzag_split,
)

__all__ = [
    "BLOCK_KERNELS", "BlockKernel", "Segment", "RingStep", "plan_ring", "ring_attention",
    "ContextParallelLayoutError", "context_parallel_loss",
    "pad_for_context_parallel",
    "split_batch_for_context_parallel", "zigzag_gather", "zigzag_positions", "zigzag_split",
]
