"""Full vs chunked vs logits-masked LM head: peak memory and time of (a) inference prefill
(next-token logits of the last position) and (b) a training step (loss + backward) with a
fraction of labelled tokens, plus the longest prefill each head fits in a memory cap.

    .venv/bin/python tools/benchmarks/lm_head.py

Prints one JSON line. Peak memory is the high-water mark of live tensor storages allocated
during the step (inputs excluded), tracked by a TorchDispatchMode (:class:`LiveTensorBytes`),
so it counts exactly what the head allocates, independent of the CPU allocator. A [16K x
151,936] fp32 logits matrix alone is 10 GB, more than this machine can spare, so each
head's peak is measured at ``--fit-tokens`` lengths, fitted as ``a + b * tokens`` (every
allocation is linear in the token count) and the fit is checked against a measurement at
``--time-tokens``, where the time is measured too (megatron's vocab-parallel cross-entropy at
TP=1, fp32): wall and process CPU seconds, the ratios from CPU seconds because the machine's
cores are shared. The masked head is unchunked; the chunked head uses ``--chunk-size``. The
cap search adds the inputs (output weight and [tokens, hidden] states) and covers the head
only, not the decoder's activations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import weakref
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from megatron_longvita.models.heads import OUTPUT_HEADS, OutputHead, VocabProjection  # noqa: E402

HEADS = ("full", "chunked", "masked")
GIB = 2**30


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while the mode is active and still alive.

    ``inputs`` existed before: views of them (a weight's transpose) allocate nothing.
    """

    def __init__(self, inputs: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = {id(tensor.untyped_storage()) for tensor in inputs}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)  # storages keep their Python object while alive, so id() is stable
        if key in self._seen:  # views and in-place results share a storage
            return
        self._seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


def _init_tensor_parallel_group() -> None:
    """megatron's cross-entropy all-reduces over the TP group: a one-rank gloo world."""
    from megatron_longvita.config.parallel import ParallelConfig
    from megatron_longvita.platform import initialize_distributed
    from tests.harness import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    initialize_distributed(ParallelConfig())


def _inputs(tokens: int, hidden: int, vocab: int, label_fraction: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=generator) * hidden ** -0.5
    states = torch.randn(tokens, hidden, generator=generator)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    loss_mask = torch.zeros(tokens)
    loss_mask[torch.randperm(tokens, generator=generator)[:round(label_fraction * tokens)]] = 1.0
    return weight, states, labels, loss_mask


def _measure(step: Callable[[], None], inputs: tuple[torch.Tensor, ...]) -> tuple[int, float, float]:
    """(peak bytes allocated by ``step``, wall seconds, process CPU seconds)."""
    tracker = LiveTensorBytes(inputs)
    wall, cpu = time.perf_counter(), time.process_time()
    with tracker:
        step()
    return tracker.peak, time.perf_counter() - wall, time.process_time() - cpu


def _run(head: OutputHead, task: str, tokens: int, args) -> tuple[int, float, float]:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    inputs = _inputs(tokens, args.hidden, args.vocab, args.label_fraction)
    weight, states, labels, loss_mask = inputs
    vocab = VocabProjection(lambda hidden: F.linear(hidden, weight), vocab_parallel_cross_entropy)
    last = torch.tensor([tokens - 1])
    if task == "prefill":

        def step() -> None:
            with torch.no_grad():
                head.logits(states, last, vocab)
    else:
        weight.requires_grad_()
        states.requires_grad_()

        def step() -> None:
            loss = (head.loss(states, labels, loss_mask, vocab) * loss_mask).sum() / loss_mask.sum()
            loss.backward()
    return _measure(step, (*inputs, last))


def _fit(points: dict[int, int]) -> tuple[float, float]:
    (n1, p1), (n2, p2) = sorted(points.items())
    slope = (p2 - p1) / (n2 - n1)
    return p1 - slope * n1, slope


def _longest_prefill(intercept: float, slope: float, args) -> int:
    """Largest token count whose inputs + prefill peak fit under the cap (binary search)."""
    def fits(tokens: int) -> bool:
        inputs = 4 * (args.vocab * args.hidden + tokens * args.hidden)
        return inputs + intercept + slope * tokens <= args.cap_gib * GIB

    low, high = 0, 1
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="length the memory figures are reported at")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--label-fraction", type=float, default=0.05)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--fit-tokens", type=int, nargs=2, default=(1024, 1536))
    parser.add_argument("--time-tokens", type=int, default=2048, help="measured length: times + fit check")
    parser.add_argument("--cap-gib", type=float, default=16.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    _init_tensor_parallel_group()

    result: dict = {"tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "dtype": "float32",
                    "label_fraction": args.label_fraction, "chunk_size": args.chunk_size,
                    "time_tokens": args.time_tokens, "cap_gib": args.cap_gib, "threads": torch.get_num_threads(),
                    "memory": "peak live tensor bytes allocated by the step (TorchDispatchMode), inputs excluded"}
    wall, cpu = f"wall_s_at_{args.time_tokens}", f"cpu_s_at_{args.time_tokens}"
    for task in ("prefill", "train"):
        figures, peaks = {}, {}
        for name in HEADS:
            head = OUTPUT_HEADS.get(name)(args.chunk_size if name == "chunked" else None)
            intercept, slope = _fit({n: _run(head, task, n, args)[0] for n in args.fit_tokens})
            measured, wall_s, cpu_s = _run(head, task, args.time_tokens, args)
            peaks[name] = intercept + slope * args.tokens
            figures[name] = {"peak_mib": round(peaks[name] / 2**20, 3), wall: round(wall_s, 3), cpu: round(cpu_s, 3),
                             "fit_error": round(abs(intercept + slope * args.time_tokens - measured) / measured, 5)}
            if task == "prefill":
                figures[name]["max_tokens_in_cap"] = _longest_prefill(intercept, slope, args)
        for name in ("chunked", "masked"):
            figures[name]["peak_vs_full"] = round(peaks[name] / peaks["full"], 6)
            figures[name]["cpu_time_vs_full"] = round(figures[name][cpu] / figures["full"][cpu], 4)
            if task == "prefill":
                figures[name]["max_tokens_vs_full"] = round(
                    figures[name]["max_tokens_in_cap"] / figures["full"]["max_tokens_in_cap"], 2)
        result[task] = figures
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
