"""A training step (forward + backward + optimizer) of plain megatron-core against ours, same
decoder config, same weights, same data, same run, at TP1 and TP2 (gloo), plus the model-FLOPs
utilisation of ours against the measured peak of its largest GEMM.

    .venv/bin/python tools/benchmarks/train_step.py

(a) megatron-core's ``GPTModel`` with its own local layer spec (``get_gpt_layer_local_spec``,
    DotProductAttention: unfused masked softmax over [s, s] scores), megatron's output layer
    and vocab-parallel cross-entropy.
(b) our decoder: ``HeadedGPTModel`` (the configured output head, ``--head``) with ring attention
    as core attention ("local_ring" spec, CP=1, the ring's block kernel), built by
    ``build_decoder`` as training does.
Both run through megatron DDP, ``get_megatron_optimizer`` (Adam, fp32) and
``get_forward_backward_func``, the path ``training/loop.py`` takes. (b) starts from (a)'s
weights, and its first loss must equal (a)'s (``loss_a``/``loss_b``): the two compute the same
function.

Time: after a warm-up step each, ``--repeats`` steps of a and b interleaved (a, b, a, b, ...);
the median per model, the ratio of medians and the spread (min, max) are reported, the
slowest rank's. Memory: the exact high-water mark of live tensor storages a step allocates
on a rank (LiveTensorBytes in tests/references.py), measured on a step after the warm-up, every
tensor that existed before (weights, gradient buffers, optimizer states) excluded.

MFU of (b): model FLOPs per step / TP / median step time, over the peak FLOP/s of a plain
``torch.matmul`` of the step's largest GEMM (the output layer's [T, h] x [h, V/TP]) timed in
the same process just before each pair of steps (median; ``mfu_b``). On a shared host the
load changes within seconds, so each repeat's figure against the matmul timed just before it
(``mfu_b_per_repeat``) and the fastest step against the fastest matmul are reported too, and
the same figures in process CPU seconds (``cpu_s_*``, ``mfu_b_cpu_time``; one thread per
rank): the time a rank actually ran, which other processes on the host do not inflate.

Model FLOPs per step, T tokens per micro-batch, L layers, hidden h, ffn f, q heads x head
dim = hq*d, kv heads hkv, padded vocab V:

    3 x [ L x ( 2T (h (hq d + 2 hkv d) + hq d h + 3 h f) + 2 T^2 hq d ) + 2 T h V ]

(3 = forward + backward at twice the forward; linear layers 2 FLOPs per multiply-add;
causal attention counts the T^2/2 query-key pairs it needs, for QK^T and PV). Norms,
activations, softmax, RoPE and the optimizer count zero, as usual for MFU.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from tests.harness import run_distributed  # noqa: E402
from tests.references import MIB, LiveTensorBytes  # noqa: E402
from tools.benchmarks.decoder_shape import add_decoder_shape_arguments, decoder_config  # noqa: E402


def model_flops(args: argparse.Namespace, vocab: int) -> float:
    tokens, hidden, head_dim = args.seq_length * args.micro_batch_size, args.hidden, args.hidden // args.heads
    linear = (
        hidden * (args.heads * head_dim + 2 * args.kv_heads * head_dim)
        + args.heads * head_dim * hidden
        + 3 * hidden * args.ffn
    )
    attention = 2 * args.seq_length**2 * args.micro_batch_size * args.heads * head_dim
    return 3.0 * (args.layers * (2 * tokens * linear + attention) + 2 * tokens * hidden * vocab)


def _forward_step(data_iterator, model):
    from megatron_longvita.training.loop import masked_loss

    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
    return output, functools.partial(masked_loss, batch["loss_mask"])


def _rank_benchmark(tp: int, args: argparse.Namespace) -> dict:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig

    from megatron_longvita.config.parallel import ParallelConfig
    from megatron_longvita.models.decoder import build_decoder
    from megatron_longvita.models.heads import HeadConfig
    from megatron_longvita.platform import initialize_distributed, setup_platform
    from megatron_longvita.training.loop import setup_training, train_step

    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    platform = setup_platform()
    initialize_distributed(parallel, platform=platform)
    config = decoder_config(args)
    vocab = config.padded_vocab_size(tp)
    torch.manual_seed(0)
    plain_config = config.transformer_config(parallel)
    plain = GPTModel(
        config=plain_config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization=plain_config.normalization),
        vocab_size=vocab,
        max_sequence_length=config.max_position_embeddings,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(config.rotary_base),
    )
    ours = build_decoder(
        config,
        config.transformer_config(parallel),
        layer_spec="local_ring",
        head=HeadConfig(mode=args.head, chunk_size=args.chunk_size),
        platform=platform,
    )
    ours.load_state_dict(plain.state_dict())
    optimizer = OptimizerConfig(optimizer="adam", lr=1e-4, weight_decay=0.0, clip_grad=1.0)
    states = {"a": setup_training([plain], optimizer), "b": setup_training([ours], optimizer)}

    generator = torch.Generator().manual_seed(1)
    shape = (args.micro_batch_size, args.seq_length)
    batch = {
        "tokens": torch.randint(0, args.vocab, shape, generator=generator),
        "labels": torch.randint(0, args.vocab, shape, generator=generator),
        "loss_mask": torch.ones(shape),
        "position_ids": torch.arange(args.seq_length).expand(shape).contiguous(),
    }

    def step(name: str):
        return train_step(states[name], _forward_step, iter([batch]), 1, args.seq_length, args.micro_batch_size)

    losses = {name: step(name).loss for name in states}  # the warm-up; also builds the optimizer states
    peaks = {}
    for name in states:
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on some of gc's objects warns about deprecated torch types
            warnings.simplefilter("ignore")
            existing = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
        tracker = LiveTensorBytes(existing)
        with tracker:
            step(name)
        del existing
        peaks[name] = tracker.peak

    # the step's largest GEMM: the output layer, [T, h] x [h, V / TP]
    lhs = torch.randn(args.seq_length * args.micro_batch_size, args.hidden)
    rhs = torch.randn(args.hidden, vocab // tp)
    times = {"a": [], "b": [], "matmul": []}
    cpu_times = {"a": [], "b": [], "matmul": []}
    for _ in range(args.repeats):
        for name in ("matmul", "a", "b"):
            started, cpu_started = time.perf_counter(), time.process_time()
            if name == "matmul":
                for _ in range(args.matmul_calls):
                    torch.matmul(lhs, rhs)
            else:
                step(name)
            calls = args.matmul_calls if name == "matmul" else 1
            times[name].append((time.perf_counter() - started) / calls)
            cpu_times[name].append((time.process_time() - cpu_started) / calls)
    return {"losses": losses, "peaks": peaks, "times": times, "cpu_times": cpu_times, "vocab": vocab}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    add_decoder_shape_arguments(parser, layers=2, hidden=1024, ffn=3072, heads=16, kv_heads=4, vocab=8192)
    parser.add_argument("--head", default="full", help="our training output head: full | chunked | masked")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per model, interleaved")
    parser.add_argument("--matmul-calls", type=int, default=3, help="matmuls per timed peak measurement")
    args = parser.parse_args()
    os.environ.setdefault("LONGVITA_PLATFORM", "cpu")
    report = {
        key: getattr(args, key)
        for key in (
            "seq_length",
            "micro_batch_size",
            "layers",
            "hidden",
            "ffn",
            "heads",
            "kv_heads",
            "vocab",
            "head",
            "repeats",
        )
    }
    report.update(dtype="float32", threads_per_rank=1, tp={})
    for tp in args.tp_sizes:
        ranks = run_distributed(_rank_benchmark, tp, tp, args, timeout=7200)
        median = {name: max(statistics.median(r["times"][name]) for r in ranks) for name in ("a", "b", "matmul")}
        spread = {
            name: [
                round(min(min(r["times"][name]) for r in ranks), 3),
                round(max(max(r["times"][name]) for r in ranks), 3),
            ]
            for name in ("a", "b")
        }
        peak = {name: max(r["peaks"][name] for r in ranks) / MIB for name in ("a", "b")}
        vocab = ranks[0]["vocab"]
        gemm_flops = 2.0 * args.seq_length * args.micro_batch_size * args.hidden * (vocab // tp)
        flops = model_flops(args, vocab)
        achieved = flops / tp / median["b"]
        matmul_peak = gemm_flops / median["matmul"]
        # the load of a shared host changes within seconds: each repeat's step against the matmul timed just before it
        per_repeat = [
            gemm_flops / m / (flops / tp / b) for r in ranks for m, b in zip(r["times"]["matmul"], r["times"]["b"])
        ]
        cpu = {name: max(statistics.median(r["cpu_times"][name]) for r in ranks) for name in ("a", "b", "matmul")}
        report["tp"][str(tp)] = {
            "loss_a": ranks[0]["losses"]["a"],
            "loss_b": ranks[0]["losses"]["b"],
            "step_s_a": round(median["a"], 3),
            "step_s_b": round(median["b"], 3),
            "step_s_spread_a": spread["a"],
            "step_s_spread_b": spread["b"],
            "time_b_over_a": round(median["b"] / median["a"], 4),
            "peak_mib_a": round(peak["a"], 2),
            "peak_mib_b": round(peak["b"], 2),
            "peak_b_over_a": round(peak["b"] / peak["a"], 4),
            "model_tflop_per_step": round(flops / 1e12, 4),
            "achieved_gflops_per_rank_b": round(achieved / 1e9, 2),
            "matmul_peak_gflops_per_rank": round(matmul_peak / 1e9, 2),
            "largest_gemm": [args.seq_length * args.micro_batch_size, args.hidden, vocab // tp],
            "mfu_b": round(achieved / matmul_peak, 4),
            "cpu_s_a": round(cpu["a"], 3),
            "cpu_s_b": round(cpu["b"], 3),
            "cpu_time_b_over_a": round(cpu["b"] / cpu["a"], 4),
            "mfu_b_cpu_time": round(flops / tp / cpu["b"] / (gemm_flops / cpu["matmul"]), 4),
            "mfu_b_per_repeat": sorted(round(1 / x, 3) for x in per_repeat),
            "mfu_b_best_over_best": round(
                flops
                / tp
                / min(min(r["times"]["b"]) for r in ranks)
                / (gemm_flops / min(min(r["times"]["matmul"]) for r in ranks)),
                4,
            ),
        }
        print(f"TP={tp}: {report['tp'][str(tp)]}", file=sys.stderr, flush=True)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
