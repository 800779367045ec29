"""Ring attention at CP=1/2/4: per-rank time and peak activation memory, zigzag causal work
balance (vs a contiguous split) and how much of the K/V ring traffic hides behind compute.

    .venv/bin/python tools/benchmarks/ring_attention.py --seq-length 4096

Prints one JSON line. Memory is exact: the high-water mark of live tensor storages one
forward + backward allocates on each rank (q, k, v and the output gradient excluded; see
LiveTensorBytes in tests/references.py), also split into the forward's peak, what the forward
leaves for the backward (output and saved tensors) and the backward's peak; ``at_peak`` lists
rank 0's live buffers at its high-water mark. On CPU all ranks share the machine's cores, so
CP>1 times measure the algorithm's overheads, not a speed-up. ``--memory-only`` skips the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.harness

from megatron_longvita.parallel import BLOCK_KERNELS, plan_ring, ring_attention, zigzag_positions  # noqa: E402
from megatron_longvita.parallel.ring import RingExchange  # noqa: E402
from tests.harness import run_distributed  # noqa: E402
from tests.references import MIB, LiveTensorBytes  # noqa: E402


def causal_flops(q_positions: torch.Tensor, heads: int, head_dim: int) -> float:
    """Forward attention FLOPs (QK^T and PV) of these query positions under a causal mask."""
    return 4.0 * heads * head_dim * float((q_positions + 1).sum())


def planned_flops(cp_size: int, rank: int, local_length: int, heads: int, head_dim: int) -> float:
    """FLOPs the ring actually computes on this rank (causal segments count their triangle)."""
    total = 0.0
    for step in plan_ring(cp_size, rank, local_length):
        for seg in step.segments:
            q, k = seg.q_end - seg.q_start, seg.k_end - seg.k_start
            total += q * (q + 1) / 2 if step.causal else q * k
    return 4.0 * heads * head_dim * total


def work_balance(seq_length: int, cp_size: int, heads: int, head_dim: int) -> dict[str, float]:
    local = seq_length // cp_size
    zigzag = [planned_flops(cp_size, r, local, heads, head_dim) for r in range(cp_size)]
    contiguous = [causal_flops(torch.arange(r * local, (r + 1) * local), heads, head_dim) for r in range(cp_size)]
    exact = [causal_flops(zigzag_positions(seq_length, cp_size, r), heads, head_dim) for r in range(cp_size)]
    return {
        "zigzag_max_over_min": max(zigzag) / min(zigzag),
        "zigzag_exact_mask_max_over_min": max(exact) / min(exact),
        "contiguous_max_over_min": max(contiguous) / min(contiguous),
    }


def _timed(fn, iterations: int) -> float:
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _memory(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, group, kernel: str) -> dict:
    """Exact per-rank peaks of one forward + backward (inputs excluded), and the buffers at the peak."""
    tracker = LiveTensorBytes((q, k, v, dout), where=True)
    with tracker:
        tracker.phase = "forward"
        out = ring_attention(q, k, v, group, kernel=kernel)
        held = tracker.live
        tracker.phase = "backward"
        grads = torch.autograd.grad(out, (q, k, v), dout)
        del out, grads
    return {
        "peak_activation_mib": round(tracker.peak / MIB, 3),
        "forward_peak_mib": round(tracker.phase_peaks["forward"] / MIB, 3),
        "held_for_backward_mib": round(held / MIB, 3),
        "backward_peak_mib": round(tracker.phase_peaks["backward"] / MIB, 3),
        "at_peak": tracker.at_peak(min_bytes=MIB // 4),
    }


def _rank_benchmark(
    seq_length: int, heads: int, kv_heads: int, head_dim: int, iterations: int, memory_only: bool
) -> dict:
    from megatron_longvita.platform import setup_platform

    platform = setup_platform()
    world = int(os.environ["WORLD_SIZE"])
    device = platform.local_device()
    group = None
    if world > 1:
        dist.init_process_group(platform.backend)
        group = dist.group.WORLD
    local = seq_length // world
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(local, 1, h, head_dim, generator=generator).to(device).requires_grad_()
        for h in (heads, kv_heads, kv_heads)
    )
    dout = torch.randn(local, 1, heads, head_dim, generator=generator).to(device)
    result = _memory(q, k, v, dout, group, platform.attention_kernel)  # also the warm-up (and the plan cache)
    if memory_only:
        if group is not None:
            dist.destroy_process_group()
        return result

    def step() -> None:
        torch.autograd.grad(ring_attention(q, k, v, group, kernel=platform.attention_kernel), (q, k, v), dout)

    def forward() -> None:
        with torch.no_grad():
            ring_attention(q, k, v, group, kernel=platform.attention_kernel)

    result["fwd_bwd_s"] = _timed(step, iterations)
    if world > 1:
        # forward split into its parts: the block kernels alone, the K/V ring alone, and both overlapped
        kernel = BLOCK_KERNELS.get(platform.attention_kernel)
        q_, kv = q.detach().permute(1, 2, 0, 3), torch.stack([k, v]).detach().permute(0, 2, 3, 1, 4)
        steps = plan_ring(world, dist.get_rank(), local)

        def compute() -> list:
            return [kernel.forward(q_, kv[0], kv[1], s.segments, s.causal, head_dim**-0.5) for s in steps]

        exchange, buffers = RingExchange(group, tag=0), ((kv.contiguous(),), (torch.empty_like(kv.contiguous()),))

        def communicate() -> None:
            for i in range(world - 1):
                exchange.start(buffers[i % 2], buffers[(i + 1) % 2])
                exchange.wait()

        t_compute, t_comm, t_total = (_timed(fn, iterations) for fn in (compute, communicate, forward))
        hidden = t_compute + t_comm - t_total
        result.update(
            fwd_s=t_total,
            fwd_compute_s=t_compute,
            fwd_comm_s=t_comm,
            overlap_efficiency=max(0.0, min(1.0, hidden / t_comm)) if t_comm > 0 else 1.0,
        )
        dist.destroy_process_group()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--cp-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--memory-only", action="store_true", help="exact memory figures only, no timings")
    args = parser.parse_args()
    os.environ.setdefault("LONGVITA_PLATFORM", "cpu")
    report = {
        "seq_length": args.seq_length,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "dtype": "float32",
        "cp": {},
    }
    for cp_size in args.cp_sizes:
        ranks = run_distributed(
            _rank_benchmark,
            cp_size,
            args.seq_length,
            args.heads,
            args.kv_heads,
            args.head_dim,
            args.iterations,
            args.memory_only,
            timeout=3600,
        )
        summary = {key: round(max(r[key] for r in ranks), 4) for key in ranks[0] if key != "at_peak"}
        summary["peak_activation_mib_max_over_min"] = round(
            max(r["peak_activation_mib"] for r in ranks) / min(r["peak_activation_mib"] for r in ranks), 4
        )
        if not args.memory_only:
            summary["fwd_bwd_s_max_over_min"] = round(
                max(r["fwd_bwd_s"] for r in ranks) / min(r["fwd_bwd_s"] for r in ranks), 3
            )
        if cp_size > 1 and not args.memory_only:
            summary["overlap_efficiency"] = round(min(r["overlap_efficiency"] for r in ranks), 3)
        if cp_size > 1:
            summary.update(
                {k: round(v, 4) for k, v in work_balance(args.seq_length, cp_size, args.heads, args.head_dim).items()}
            )
        if cp_size != args.cp_sizes[0]:
            summary[f"peak_activation_vs_cp{args.cp_sizes[0]}"] = round(
                summary["peak_activation_mib"] / report["cp"][str(args.cp_sizes[0])]["peak_activation_mib"], 4
            )
        summary["at_peak_rank0"] = ranks[0]["at_peak"]
        report["cp"][str(cp_size)] = summary
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
