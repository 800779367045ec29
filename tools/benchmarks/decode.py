"""Cached context-parallel decoding vs the paper's fixed-length re-prefill, tiny model, CPU/gloo.

    .venv/bin/python tools/benchmarks/decode.py [--context 8192] [--cp 1 2]

Per CP size: prefill time of a ``--context``-token text prompt, per-token decode latency of
the engine's cached decoding (``--new-tokens`` steps, KV cache sharded over CP; mean and
median, the median being robust to the host's stalls) and of the fixed-length method (the
whole prompt + max-output sequence re-run per token, ``--fixed-steps`` steps, mean), their
ratios, and each rank's peak RSS (CPU; peak allocated memory on CUDA). The model is the "tiny"
preset with random weights (random init is enough: cost does not depend on the values).
Prints one JSON line; times are the slowest rank's.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from tests.harness import run_distributed  # noqa: E402


def _peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rank_benchmark(cp_size: int, context: int, new_tokens: int, fixed_steps: int) -> dict[str, float]:
    from megatron_longvita.config.parallel import ParallelConfig
    from megatron_longvita.inference import GenerationConfig, GenerationRequest, InferenceEngine
    from megatron_longvita.models.heads import HeadConfig
    from megatron_longvita.models.long_vita import long_vita_provider
    from megatron_longvita.models.presets import get_preset
    from megatron_longvita.models.specs import INFERENCE
    from megatron_longvita.platform import initialize_distributed, setup_platform
    from megatron_longvita.training.loop import build_model_chunks

    parallel = ParallelConfig(context_parallel_size=cp_size)
    platform = setup_platform()
    initialize_distributed(parallel, platform=platform)
    config = get_preset("tiny")
    [model] = build_model_chunks(
        long_vita_provider(config, parallel, platform=platform, purpose=INFERENCE, head=HeadConfig())
    )
    engine = InferenceEngine(model.eval(), config.decoder.vocab_size)
    prompt = GenerationRequest(torch.randint(0, 200, (context,), generator=torch.Generator().manual_seed(0)).tolist())
    engine.generate([prompt], GenerationConfig(max_new_tokens=8))  # warm-up
    cached = engine.generate([prompt], GenerationConfig(max_new_tokens=new_tokens + 1))[0].tokens
    cached_timing = engine.timing
    fixed = engine.generate([prompt], GenerationConfig(max_new_tokens=fixed_steps + 1, decode_mode="fixed-length"))
    fixed_timing = engine.timing
    if fixed[0].tokens != cached[: fixed_steps + 1]:
        raise AssertionError(f"cached and fixed-length greedy tokens differ: {cached} vs {fixed[0].tokens}")
    return {
        "prefill_s": cached_timing.prefill_s,
        "cached_decode_ms_per_token": cached_timing.per_token_s * 1e3,
        "cached_decode_ms_median": cached_timing.median_token_s * 1e3,
        "fixed_length_ms_per_token": fixed_timing.per_token_s * 1e3,
        "peak_memory_mib": _peak_memory_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=8192, help="prompt tokens")
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--new-tokens", type=int, default=128, help="cached decode steps timed")
    parser.add_argument("--fixed-steps", type=int, default=3, help="fixed-length re-prefill steps timed")
    args = parser.parse_args()
    result = {"model": "tiny", "context": args.context, "dtype": "float32", "cp": {}}
    for cp_size in args.cp:
        ranks = run_distributed(
            _rank_benchmark, cp_size, cp_size, args.context, args.new_tokens, args.fixed_steps, timeout=1800
        )
        summary = {key: round(max(r[key] for r in ranks), 3) for key in ranks[0]}
        summary["per_rank_peak_memory_mib"] = [round(r["peak_memory_mib"], 1) for r in ranks]
        del summary["peak_memory_mib"]
        summary["speedup_median"] = round(summary["fixed_length_ms_per_token"] / summary["cached_decode_ms_median"], 1)
        summary["speedup_mean"] = round(summary["fixed_length_ms_per_token"] / summary["cached_decode_ms_per_token"], 1)
        result["cp"][str(cp_size)] = summary
    print(json.dumps(result))


if __name__ == "__main__":
    main()
