"""Per-rank peak memory of the whole decoder (embedding, layers with ring attention, final norm,
output head and loss) in forward + backward under context parallelism, CP=1/2/4, CPU/gloo.

    .venv/bin/python tools/benchmarks/decoder_memory.py --seq-length 65536

Prints one JSON line. Memory is exact: the high-water mark of live tensor storages one
training forward + backward allocates on each rank (LiveTensorBytes in tests/references.py).
Parameters, their gradients (allocated before the step, as a gradient buffer would be) and
the micro-batch are excluded: what remains is activations, saved tensors, communication
buffers and temporaries. Also reported: the forward's peak, what it holds for the backward,
the backward's peak, and rank 0's largest live buffers at its peak (``at_peak_rank0``).

The sequence is packed into ``--document-length``-token documents (reset attention), as
Long-VITA's packed training data is: memory does not depend on the document length (the ring
moves whole K/V blocks either way), and it keeps the attention's compute, quadratic in the
document length, small enough for a CPU run at 64K tokens. Every CP size runs the ring
attention layer spec ("local_ring"; at CP=1 it is plain flash attention), with the same
weights and tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from tests.harness import run_distributed  # noqa: E402
from tests.references import MIB, LiveTensorBytes  # noqa: E402
from tools.benchmarks.decoder_shape import add_decoder_shape_arguments, decoder_config  # noqa: E402


def _rank_memory(cp_size: int, args: argparse.Namespace) -> dict:
    import torch.distributed as dist

    from megatron_longvita.config.parallel import ParallelConfig
    from megatron_longvita.models.decoder import build_decoder
    from megatron_longvita.models.heads import HeadConfig
    from megatron_longvita.parallel import split_batch_for_context_parallel
    from megatron_longvita.parallel.attention import packed_seq_params_for_context_parallel
    from megatron_longvita.platform import initialize_distributed, setup_platform

    parallel = ParallelConfig(context_parallel_size=cp_size)
    platform = setup_platform()
    initialize_distributed(parallel, platform=platform)
    config = decoder_config(args)
    torch.manual_seed(0)
    model = build_decoder(
        config,
        config.transformer_config(parallel),
        layer_spec="local_ring",
        head=HeadConfig(mode=args.head),
        platform=platform,
    )
    generator = torch.Generator().manual_seed(1)
    length = args.seq_length
    batch = {
        "tokens": torch.randint(0, args.vocab, (1, length), generator=generator),
        "labels": torch.randint(0, args.vocab, (1, length), generator=generator),
        "loss_mask": torch.ones(1, length),
        "position_ids": torch.arange(length)[None],
        "cu_seqlens": torch.arange(0, length + 1, args.document_length, dtype=torch.int32),
    }
    local = split_batch_for_context_parallel(batch, cp_size, dist.get_rank())
    packed = packed_seq_params_for_context_parallel(local["cu_seqlens"], length)
    params = list(model.parameters())
    for param in params:
        param.grad = torch.zeros_like(param)
    tracker = LiveTensorBytes([*params, *(p.grad for p in params), *local.values()], where=True)
    started = time.perf_counter()
    with tracker:
        tracker.phase = "forward"
        per_token = model(
            local["tokens"],
            local["position_ids"],
            attention_mask=None,
            labels=local["labels"],
            loss_mask=local["loss_mask"],
            packed_seq_params=packed,
        )
        loss = (per_token * local["loss_mask"]).sum() / length
        held = tracker.live
        tracker.phase = "backward"
        loss.backward()
        del per_token, loss
    return {
        "peak_activation_mib": round(tracker.peak / MIB, 3),
        "forward_peak_mib": round(tracker.phase_peaks["forward"] / MIB, 3),
        "held_for_backward_mib": round(held / MIB, 3),
        "backward_peak_mib": round(tracker.phase_peaks["backward"] / MIB, 3),
        "fwd_bwd_s": round(time.perf_counter() - started, 2),
        "at_peak": tracker.at_peak(top=args.top),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-length", type=int, default=65536)
    parser.add_argument("--document-length", type=int, default=2048)
    parser.add_argument("--cp-sizes", type=int, nargs="+", default=[1, 2, 4])
    add_decoder_shape_arguments(parser, layers=2, hidden=256, ffn=768, heads=4, kv_heads=2, vocab=1024)
    parser.add_argument("--head", default="full", help="training output head: full | masked (chunked needs a size)")
    parser.add_argument("--top", type=int, default=12, help="largest buffers listed at the peak")
    args = parser.parse_args()
    os.environ.setdefault("LONGVITA_PLATFORM", "cpu")
    report = {
        key: getattr(args, key)
        for key in ("seq_length", "document_length", "layers", "hidden", "ffn", "heads", "kv_heads", "vocab", "head")
    }
    report.update(
        dtype="float32",
        memory="peak live tensor bytes of one forward + backward per rank "
        "(TorchDispatchMode); parameters, gradients and the micro-batch excluded",
        cp={},
    )
    for cp_size in args.cp_sizes:
        ranks = run_distributed(_rank_memory, cp_size, cp_size, args, timeout=3600)
        peaks = [r["peak_activation_mib"] for r in ranks]
        summary = {key: max(r[key] for r in ranks) for key in ranks[0] if key != "at_peak"}
        summary["peak_activation_mib_max_over_min"] = round(max(peaks) / min(peaks), 4)
        if cp_size != args.cp_sizes[0]:
            first = report["cp"][str(args.cp_sizes[0])]["peak_activation_mib"]
            summary[f"peak_activation_vs_cp{args.cp_sizes[0]}"] = round(summary["peak_activation_mib"] / first, 4)
        summary["at_peak_rank0"] = ranks[0]["at_peak"]
        report["cp"][str(cp_size)] = summary
        print(f"CP={cp_size}: {summary}", file=sys.stderr, flush=True)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
