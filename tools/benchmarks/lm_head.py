"""Full vs chunked vs logits-masked LM head: peak memory and time of (a) inference prefill
(next-token logits of the last position) and (b) a training step (loss + backward) with a
fraction of labelled tokens, plus the longest prefill each head fits in a memory cap.

    .venv/bin/python tools/benchmarks/lm_head.py

Prints one JSON line. Peak memory is the high-water mark of live tensor storages allocated
during the step (inputs excluded), tracked by a TorchDispatchMode (:class:`LiveTensorBytes`),
so it counts exactly what the head allocates, independent of the CPU allocator. The head
code runs under torch's FakeTensorMode for the memory figures: tensors carry sizes but no
data, so the 16K peaks (a 16K x 151,936 fp32 logits matrix alone is 10 GB) are counted
exactly without being allocated. The fake count is checked against a real run at
``--check-tokens`` (and at every length timed for real). Times are real runs (megatron's
vocab-parallel cross-entropy at TP=1, fp32; wall and process CPU seconds, ratios per token
from CPU seconds because the machine's cores are shared) at ``--tokens``, or, where
``--headroom`` x (peak + inputs) exceeds the available RAM, at the longest length that
fits (reported as ``time_tokens``). The masked head is unchunked; the chunked head uses
``--chunk-size``. The cap search adds the inputs (output weight, [tokens, hidden] states)
and covers the head only, not the decoder's activations.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from megatron_longvita.models.heads import OUTPUT_HEADS, OutputHead, VocabProjection  # noqa: E402
from tests.references import LiveTensorBytes  # noqa: E402  (the tracker the head tests use)

HEADS = ("full", "chunked", "masked")
GIB = 2**30


@dataclass(frozen=True)
class Step:
    peak: int  # bytes allocated by the step at its high-water mark
    inputs: int  # bytes of the tensors it reads (output weight, hidden states, labels)
    wall_s: float
    cpu_s: float

    @property
    def needs(self) -> int:
        return self.peak + self.inputs


def _init_tensor_parallel_group() -> None:
    """megatron's cross-entropy all-reduces over the TP group: a one-rank gloo world."""
    from megatron_longvita.config.parallel import ParallelConfig
    from megatron_longvita.platform import initialize_distributed, setup_platform
    from tests.harness import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    initialize_distributed(ParallelConfig(), platform=setup_platform())


def _inputs(tokens: int, hidden: int, vocab: int, label_fraction: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=generator) * hidden**-0.5
    states = torch.randn(tokens, hidden, generator=generator)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labelled = round(label_fraction * tokens)
    loss_mask = torch.zeros(tokens)
    loss_mask[torch.randperm(tokens, generator=generator)[:labelled]] = 1.0
    if isinstance(loss_mask, FakeTensor):  # no values to count: tell the masked head's nonzero() its size
        loss_mask.nonzero_memo = labelled
    return weight, states, labels, loss_mask


def _measure(step: Callable[[], None], inputs: tuple[torch.Tensor, ...]) -> Step:
    tracker = LiveTensorBytes(inputs)
    wall, cpu = time.perf_counter(), time.process_time()
    with tracker:
        step()
    return Step(tracker.peak, sum(t.nbytes for t in inputs), time.perf_counter() - wall, time.process_time() - cpu)


def _run(head: OutputHead, task: str, tokens: int, args) -> Step:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    weight, states, labels, loss_mask = _inputs(tokens, args.hidden, args.vocab, args.label_fraction)
    vocab = VocabProjection(lambda hidden: F.linear(hidden, weight), vocab_parallel_cross_entropy)
    if task == "prefill":
        last = torch.tensor([tokens - 1])

        def step() -> None:
            with torch.no_grad():
                head.logits(states, last, vocab)

        return _measure(step, (weight, states, last))

    weight.requires_grad_()
    states.requires_grad_()

    def step() -> None:
        loss = (head.loss(states, labels, loss_mask, vocab) * loss_mask).sum() / loss_mask.sum()
        loss.backward()

    return _measure(step, (weight, states, labels, loss_mask))


def _fake_run(head: OutputHead, task: str, tokens: int, args) -> Step:
    """The same step on fake tensors: exact sizes, nothing allocated or computed (its times mean nothing)."""
    # the ShapeEnv lets nonzero() run (its size comes from the memo set in _inputs); sizes stay static
    with FakeTensorMode(shape_env=ShapeEnv(allow_dynamic_output_shape_ops=True), static_shapes=True):
        return _run(head, task, tokens, args)


def _largest(fits: Callable[[int], bool], guess: int) -> int:
    """Largest n with fits(n) (0 if none), fits monotone (true up to some n), galloping out from ``guess`` >= 1."""
    step = 1
    if fits(guess):
        low = guess
        while fits(low + step):
            low, step = low + step, 2 * step
        high = low + step
    else:
        high = guess
        while (low := max(high - step, 0)) > 0 and not fits(low):
            high, step = low, 2 * step
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _linear_guess(needs: Callable[[int], int], limit: float, lengths: tuple[int, int]) -> int:
    """Where the line through ``needs`` at two lengths reaches ``limit`` (every allocation is linear in n)."""
    (n1, p1), (n2, p2) = ((n, needs(n)) for n in lengths)
    slope = (p2 - p1) / (n2 - n1)
    return max(int((limit - p1) / slope) + n1, 1)


def _head_figures(name: str, task: str, args) -> dict:
    head = OUTPUT_HEADS.get(name)(args.chunk_size if name == "chunked" else None)

    @functools.cache
    def fake(tokens: int) -> Step:
        return _fake_run(head, task, tokens, args)

    def longest(limit: float, probe: bool = True) -> int:
        """Longest input whose peak + inputs fit in ``limit`` bytes: fake runs around the linear prediction."""
        guess = _linear_guess(lambda n: fake(n).needs, limit, (args.check_tokens, args.tokens))
        return _largest(lambda n: fake(n).needs <= limit, guess) if probe else guess

    real_check = _run(head, task, args.check_tokens, args)
    ram = psutil.virtual_memory().available / args.headroom
    time_tokens = args.tokens if fake(args.tokens).needs <= ram else longest(ram)
    if time_tokens == 0:
        raise SystemExit(f"{task} {name}: not enough free RAM to time any length (headroom {args.headroom})")
    timed = _run(head, task, time_tokens, args)
    check = {"real": real_check.peak, "fake": fake(args.check_tokens).peak}
    print(
        f"{task} {name}: peak bytes at {args.check_tokens} tokens, real {check['real']} fake {check['fake']}; "
        f"timed at {time_tokens} tokens",
        file=sys.stderr,
        flush=True,
    )
    figures = {
        "peak_mib": round(fake(args.tokens).peak / 2**20, 3),
        f"peak_bytes_at_{args.check_tokens}": check,
        "time_tokens": time_tokens,
        "wall_s": round(timed.wall_s, 3),
        "cpu_s": round(timed.cpu_s, 3),
        "real_peak_equals_fake_at_time_tokens": timed.peak == fake(time_tokens).peak,
    }
    if task == "prefill":
        # The chunked head's answer (millions of tokens) is the linear prediction itself: under fake
        # mode a chunk costs ~3 ms, a probe there ~30 s. Its need is the hidden states plus a
        # constant within one logits row, so the prediction is exact to ~170 tokens.
        probe = name != "chunked"
        figures["max_tokens_in_cap"] = longest(args.cap_gib * GIB, probe)
        figures["max_tokens_in_cap_by"] = "fake-run search" if probe else "linear prediction from fake peaks"
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="length the figures are reported at")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--label-fraction", type=float, default=0.05)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--check-tokens", type=int, default=2048, help="length of the real-vs-fake peak check")
    parser.add_argument("--cap-gib", type=float, default=16.0)
    parser.add_argument(
        "--headroom", type=float, default=1.4, help="a real run needs available RAM >= headroom x (peak + inputs)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    _init_tensor_parallel_group()

    result: dict = {
        "tokens": args.tokens,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "dtype": "float32",
        "label_fraction": args.label_fraction,
        "chunk_size": args.chunk_size,
        "check_tokens": args.check_tokens,
        "cap_gib": args.cap_gib,
        "headroom": args.headroom,
        "threads": torch.get_num_threads(),
        "memory": "peak live tensor bytes allocated by the step (TorchDispatchMode), inputs excluded, "
        "counted on fake tensors (FakeTensorMode)",
    }
    for task in ("prefill", "train"):
        figures = {name: _head_figures(name, task, args) for name in HEADS}
        full = figures["full"]
        for name in ("chunked", "masked"):
            ours = figures[name]
            ours["peak_vs_full"] = round(ours["peak_mib"] / full["peak_mib"], 6)
            ours["cpu_time_per_token_vs_full"] = round(
                ours["cpu_s"] / ours["time_tokens"] / (full["cpu_s"] / full["time_tokens"]), 4
            )
            if task == "prefill":
                ours["max_tokens_vs_full"] = round(ours["max_tokens_in_cap"] / full["max_tokens_in_cap"], 2)
        result[task] = figures
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
