"""Inspect a mixture before training: what is read, used, skipped (and why), how well it packs.

    python -m megatron_longvita.data.inspect_mixture --mixture M.yaml --tokenizer DIR --seq-length N [--reset] [--json]

Goes over one mixture epoch (or ``--max-samples``) on a single rank. Planning reads media
headers only; ``--decode`` also decodes every image and video, as training would.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from megatron_longvita.config.data import DataConfig, MediaConfig

from .loader import PackedDataLoader, plan_window
from .sample import PreparedSample, load_media_pixels
from .skips import BadSampleError, Skip, handle_bad_sample

_EXAMPLES_PER_REASON = 5


@dataclass
class MixtureReport:
    seq_length: int
    packing: str
    samples_read: Counter = field(default_factory=Counter)
    samples_used: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    skip_examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    packed_sequences: int = 0
    real_tokens: int = 0
    tiles: int = 0
    length_histogram: Counter = field(default_factory=Counter)  # power-of-two upper bound -> samples

    def add_skip(self, skip: Skip) -> None:
        self.skipped[skip.reason.value] += 1
        if len(self.skip_examples[skip.reason.value]) < _EXAMPLES_PER_REASON:
            self.skip_examples[skip.reason.value].append(f"{skip.location}: {skip.detail}")

    def add_sample(self, sample: PreparedSample) -> None:
        self.samples_used[sample.group] += 1
        self.tiles += sample.num_tiles
        self.length_histogram[2 ** math.ceil(math.log2(max(len(sample), 1)))] += 1

    def as_dict(self) -> dict[str, Any]:
        capacity = self.packed_sequences * self.seq_length
        return {
            "seq_length": self.seq_length,
            "packing": self.packing,
            "samples_read": dict(self.samples_read),
            "samples_used": dict(self.samples_used),
            "skipped": dict(self.skipped),
            "skip_examples": dict(self.skip_examples),
            "packed_sequences": self.packed_sequences,
            "real_tokens": self.real_tokens,
            "real_token_fraction": self.real_tokens / capacity if capacity else 0.0,
            "tiles": self.tiles,
            "token_length_histogram": {f"<={bound}": count for bound, count in sorted(self.length_histogram.items())},
        }


def _decoded_or_skip(item: PreparedSample | Skip, config: DataConfig) -> PreparedSample | Skip:
    if isinstance(item, Skip):
        return item
    try:
        load_media_pixels(item.media, config.media, item.location)
    except BadSampleError as error:
        return handle_bad_sample(error, config.strict, item.group)
    return item


def inspect_mixture(config: DataConfig, max_samples: int | None = None, decode: bool = False) -> MixtureReport:
    """Prepare (and with ``decode`` also decode) one epoch of this rank's stream and pack it."""
    loader = PackedDataLoader(config)
    total = loader.stream.local_epoch_length() if max_samples is None else max_samples
    report = MixtureReport(config.seq_length, config.packing)
    read = 0
    with tqdm(total=total, unit="sample", file=sys.stderr, disable=None) as progress:
        for window, items in loader.prepared_windows(0):
            items = items[: total - read]
            if decode:
                items = [_decoded_or_skip(item, config) for item in items]
            for item in items:
                report.samples_read[item.group] += 1
                if isinstance(item, Skip):
                    report.add_skip(item)
                else:
                    report.add_sample(item)
            for plan in plan_window(window, items, config, carried_skips=[]):
                report.packed_sequences += sum(1 for row in plan.rows if row)
                report.real_tokens += sum(len(sample) for row in plan.rows for sample in row)
            read += len(items)
            progress.update(len(items))
            if read >= total:
                return report
    raise AssertionError("unreachable: the mixture stream is infinite")


def format_report(report: dict[str, Any]) -> str:
    lines = [f"seq_length {report['seq_length']} ({report['packing']})", "", f"{'group':<32}{'read':>10}{'used':>10}"]
    for group, read in sorted(report["samples_read"].items()):
        lines.append(f"{group:<32}{read:>10}{report['samples_used'].get(group, 0):>10}")
    lines += ["", "skipped:" if report["skipped"] else "skipped: none"]
    for reason, count in sorted(report["skipped"].items()):
        lines.append(f"  {reason:<24}{count:>8}")
        lines += [f"      {example}" for example in report["skip_examples"][reason]]
    lines += [
        "",
        f"packed sequences     {report['packed_sequences']}",
        f"real-token fraction  {report['real_token_fraction']:.4f}",
        f"tiles                {report['tiles']}",
        "",
        "sample length (tokens)",
    ]
    peak = max(report["token_length_histogram"].values(), default=1)
    for bucket, count in report["token_length_histogram"].items():
        lines.append(f"  {bucket:>10} {count:>8} {'#' * max(1, round(40 * count / peak))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_longvita.data.inspect_mixture", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--mixture", required=True, help="stage mixture YAML")
    parser.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory")
    parser.add_argument("--seq-length", type=int, required=True)
    parser.add_argument("--reset", action="store_true", help="reset position ids per sample (stages 1-2)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--bin-packer", default="ffd")
    parser.add_argument("--pack-buffer-size", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--max-tiles", type=int, default=12)
    parser.add_argument("--max-num-frames", type=int, default=128)
    parser.add_argument("--media-root", default=None)
    parser.add_argument("--max-samples", type=int, default=None, help="stop early (default: one mixture epoch)")
    parser.add_argument("--decode", action="store_true", help="also decode all media (slower, catches corrupt data)")
    parser.add_argument("--num-workers", type=int, default=1)
    args = parser.parse_args(argv)
    config = DataConfig(
        mixture=args.mixture,
        tokenizer=args.tokenizer,
        seq_length=args.seq_length,
        packing="reset" if args.reset else "no_reset",
        bin_packer=args.bin_packer,
        pack_buffer_size=args.pack_buffer_size,
        num_workers=args.num_workers,
        media_root=args.media_root,
        media=MediaConfig(image_size=args.image_size, max_tiles=args.max_tiles, max_num_frames=args.max_num_frames),
    )
    logging.basicConfig(level=logging.ERROR)  # skips are in the report; keep the terminal readable
    report = inspect_mixture(config, args.max_samples, args.decode).as_dict()
    print(json.dumps(report) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
