"""Packing efficiency and preprocessing throughput of the data pipeline on a synthetic corpus.

    python tools/benchmarks/packing.py [--seq-length 16384] [--samples 2000] [--tokenizer DIR]

Corpus (realistic length mix at 448 px tiles, 256 tokens per tile): many short single-image
VQA samples, some multi-image samples, a few long videos (PyAV-encoded mp4). Prints one JSON
line: real-token fraction of packed rows (first-fit decreasing and greedy) against the
pad-to-longest baseline on the same samples, and tiles/s decoded per worker process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from fractions import Fraction

import av
import numpy as np
import yaml
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_longvita.data import DataConfig, MediaConfig, PackedDataLoader
from megatron_longvita.data.loader import MicroBatchBuilder, plan_window
from megatron_longvita.data.sample import PreparedSample

IMAGE_SIZES = [(640, 480), (500, 375), (1024, 768), (800, 1200), (1280, 720), (448, 448), (1700, 1100), (336, 900)]
WORDS = "what is shown in the image describe the scene count objects answer briefly a cat dog red blue car".split()


def train_tokenizer(directory: str) -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    rng = np.random.default_rng(0)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer.train_from_iterator((" ".join(rng.choice(WORDS, 20)) for _ in range(500)), trainer)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    return directory


def write_image(path: str, width: int, height: int, rng: np.random.Generator) -> str:
    """Smooth random content (upsampled noise) so decoding costs what a photo costs."""
    noise = rng.integers(0, 256, size=(max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    Image.fromarray(noise).resize((width, height), Image.Resampling.BICUBIC).save(path, quality=90)
    return path


def write_video(path: str, seconds: int, fps: int = 4, size: int = 128) -> str:
    with av.open(path, mode="w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(seconds * fps):
            pixels = np.full((size, size, 3), (index * 7) % 256, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def sentence(rng: np.random.Generator, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(low, high))))


def build_corpus(root: str, samples: int, rng: np.random.Generator) -> str:
    """~88% single-image VQA, ~11% multi-image, ~1% long video (20-60 frames at 1 fps)."""
    images = [
        write_image(os.path.join(root, f"img{i}.jpg"), *IMAGE_SIZES[i % len(IMAGE_SIZES)], rng) for i in range(40)
    ]
    videos = [write_video(os.path.join(root, f"vid{i}.mp4"), seconds=20 + 8 * i) for i in range(6)]
    records = []
    for _ in range(samples):
        kind = rng.random()
        if kind < 0.01:
            media, key = [str(rng.choice(videos))], "videos"
        elif kind < 0.12:
            media, key = [str(path) for path in rng.choice(images, int(rng.integers(2, 5)))], "images"
        else:
            media, key = [str(rng.choice(images))], "images"
        placeholder = "<image>\n" if key == "images" else "<video>\n"
        records.append({
            "messages": [
                {"role": "user", "content": placeholder * len(media) + sentence(rng, 5, 40)},
                {"role": "assistant", "content": sentence(rng, 1, 120)},
            ],
            key: media,
        })  # fmt: skip
    with open(os.path.join(root, "corpus.jsonl"), "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
    mixture = os.path.join(root, "mixture.yaml")
    with open(mixture, "w", encoding="utf-8") as handle:
        yaml.safe_dump({"dataset": {"synthetic": {"ratio": 1.0, "data_paths": ["corpus.jsonl"]}}}, handle)
    return mixture


def pad_to_longest_fraction(lengths: list[int], micro_batch_size: int) -> float:
    """Unpacked baseline: micro-batches in stream order, each padded to its longest sample."""
    padded = sum(
        max(lengths[start : start + micro_batch_size]) * len(lengths[start : start + micro_batch_size])
        for start in range(0, len(lengths), micro_batch_size)
    )
    return sum(lengths) / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=16384)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--pack-buffer-size", type=int, default=1024)
    parser.add_argument("--baseline-micro-batch", type=int, default=8)
    parser.add_argument("--throughput-batches", type=int, default=4)
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: a small BPE trained here)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        mixture = build_corpus(root, args.samples, rng)
        config = DataConfig(
            mixture=mixture,
            tokenizer=args.tokenizer or train_tokenizer(root),
            seq_length=args.seq_length,
            pack_buffer_size=args.pack_buffer_size,
            num_workers=0,  # everything below runs in this one process: per-worker figures
            media=MediaConfig(image_size=448, max_tiles=12, max_num_frames=128),
        )
        loader = PackedDataLoader(config)
        started = time.perf_counter()
        items: list[PreparedSample] = []
        for _, window in loader.prepared_windows(0):
            items += window
            if len(items) >= args.samples:
                break
        prepare_seconds = time.perf_counter() - started
        samples = [item for item in items[: args.samples] if isinstance(item, PreparedSample)]
        lengths = [len(sample) for sample in samples]

        fractions, plans = {}, []
        for packer in ("ffd", "greedy"):
            packer_config = dataclasses.replace(config, bin_packer=packer)
            windows = [
                plan_window(index, samples[start : start + args.pack_buffer_size], packer_config, [])
                for index, start in enumerate(range(0, len(samples), args.pack_buffer_size))
            ]
            rows = [row for window in windows for plan in window for row in plan.rows]
            fractions[packer] = sum(lengths) / (len(rows) * args.seq_length)
            plans = plans or [plan for window in windows for plan in window]

        builder = MicroBatchBuilder(config, loader.tokenizer.pad_id)
        started = time.perf_counter()
        tiles = sum(builder[plan]["pixel_values"].shape[0] for plan in plans[: args.throughput_batches])
        decode_seconds = time.perf_counter() - started

    print(json.dumps({
        "seq_length": args.seq_length,
        "samples": len(samples),
        "skipped": len(items[: args.samples]) - len(samples),
        "mean_sample_tokens": round(float(np.mean(lengths)), 1),
        "max_sample_tokens": max(lengths),
        "pack_buffer_size": args.pack_buffer_size,
        "packed_sequences_ffd": sum(1 for plan in plans for row in plan.rows if row),
        "real_token_fraction_ffd": round(fractions["ffd"], 4),
        "real_token_fraction_greedy": round(fractions["greedy"], 4),
        "baseline_pad_to_longest": {
            "micro_batch_size": args.baseline_micro_batch,
            "real_token_fraction": round(pad_to_longest_fraction(lengths, args.baseline_micro_batch), 4),
        },
        "prepare_samples_per_s_per_worker": round(len(items) / prepare_seconds, 1),
        "decode_tiles_per_s_per_worker": round(tiles / decode_seconds, 1),
        "decoded_tiles": tiles,
        "tile_size": 448,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
