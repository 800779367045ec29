"""Context-parallel inference engine: TP+CP prefill with the masked head, decoding over a KV
cache sharded across the CP ranks, sampling, RoPE scaling. CLI: ``-m megatron_longvita.generate``."""

from megatron_longvita.inference.engine import (
    DECODE_MODES,
    Generation,
    GenerationConfig,
    GenerationRequest,
    InferenceEngine,
    Timing,
    load_engine,
    load_for_inference,
)
from megatron_longvita.inference.rope import ROPE_SCALING_KINDS, RopeScaling
from megatron_longvita.inference.sampling import Sampler, SamplingConfig
from megatron_longvita.parallel.cache import KVCache, LayerKV

__all__ = [
    "DECODE_MODES",
    "Generation",
    "GenerationConfig",
    "GenerationRequest",
    "InferenceEngine",
    "KVCache",
    "LayerKV",
    "Timing",
    "load_engine",
    "load_for_inference",
    "ROPE_SCALING_KINDS",
    "RopeScaling",
    "Sampler",
    "SamplingConfig",
]
