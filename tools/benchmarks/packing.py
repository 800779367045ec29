"""Packing efficiency and preprocessing throughput of the data pipeline on a synthetic corpus.

    python tools/benchmarks/packing.py [--seq-length 16384] [--samples 2000] [--tokenizer DIR]
    python tools/benchmarks/packing.py --source parquet [--parquet-rows 600]

Corpus (realistic length mix at 448 px tiles, 256 tokens per tile): many short single-image
VQA samples, some multi-image samples, a few long videos (PyAV-encoded mp4). Prints one JSON
line: real-token fraction of packed rows (first-fit decreasing and greedy) against the
pad-to-longest baseline on the same samples, and tiles/s decoded per worker process.

``--source parquet``: a LLaVA-OneVision-layout parquet shard with the JPEG bytes embedded,
read by the training loader (PackedDataLoader) with 1 and 2 workers, against the training
consumption (tokens/s) of the tiny TP=2 quickstart step measured in the same run (2 gloo
ranks, tools/make_synthetic_dataset.py corpus). Prints one JSON line: samples/s, tiles/s and
real tokens/s delivered, at the tiny model's tiles (the goal: one worker keeps up) and at
448 px.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from fractions import Fraction

import av
import numpy as np
import psutil
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


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parquet_corpus(root: str, rows: int, rng: np.random.Generator) -> str:
    """A LLaVA-OneVision-layout shard (id, image {bytes, path}, conversations, data_source), row groups of 100."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    encoded = []
    for index in range(40):
        width, height = IMAGE_SIZES[index % len(IMAGE_SIZES)]
        buffer = io.BytesIO()
        noise = rng.integers(0, 256, size=(max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
        Image.fromarray(noise).resize((width, height), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    records = [
        {
            "id": str(index),
            "image": {"bytes": encoded[index % len(encoded)], "path": f"{index}.jpg"},
            "conversations": [
                {"from": "human", "value": "<image>\n" + sentence(rng, 5, 40)},
                {"from": "gpt", "value": sentence(rng, 1, 120)},
            ],
            "data_source": "benchmark",
        }
        for index in range(rows)
    ]
    path = os.path.join(root, "onevision.parquet")
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=100)
    mixture = os.path.join(root, "parquet_mixture.yaml")
    with open(mixture, "w", encoding="utf-8") as handle:
        yaml.safe_dump({"dataset": {"onevision": {"ratio": 1.0, "data_paths": [path]}}}, handle)
    return mixture


def process_cpu_seconds(processes: list) -> dict[int, float]:
    """user + system CPU seconds of each live process, by pid."""
    seconds = {}
    for process in processes:
        try:
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return seconds


def loader_rate(config: DataConfig, batches: int) -> dict:
    """What the loader delivers after its first batch (worker start-up excluded): samples, tiles
    and real tokens per wall second, and real tokens per CPU second of its busiest process (the
    rate with a core per loader process, whatever else shares the machine)."""
    iterator = iter(PackedDataLoader(config))
    next(iterator)
    here = psutil.Process()
    processes = [here, *here.children(recursive=True)]
    cpu_before = process_cpu_seconds(processes)
    started = time.perf_counter()
    samples = tiles = tokens = 0
    for _ in range(batches):
        batch = next(iterator)
        samples += batch["stats"]["samples"]
        tokens += batch["stats"]["real_tokens"]
        tiles += batch["pixel_values"].shape[0]
    seconds = time.perf_counter() - started
    cpu_after = process_cpu_seconds(processes)
    busiest = max(cpu_after[pid] - cpu_before[pid] for pid in cpu_after if pid in cpu_before)
    return {"workers": config.num_workers, "samples_per_s": round(samples / seconds, 1),
            "tiles_per_s": round(tiles / seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
            "per_cpu_s_busiest_process": {"samples": round(samples / busiest, 1), "tiles": round(tiles / busiest, 1),
                                          "tokens": round(tokens / busiest, 1)}}  # fmt: skip


def tiny_training_rates(root: str, iterations: int) -> dict:
    """Real tokens/s the tiny TP=2 quickstart stage-1 step consumes, from an actual 2-rank gloo
    run: the median logged wall rate after the first window, and tokens per CPU second of the
    busiest rank (the rate with a core per rank)."""
    data = os.path.join(root, "tiny_corpus")
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_synthetic_dataset.py"), "--out", data],
                   check=True, capture_output=True, cwd=REPO)  # fmt: skip
    env = {**os.environ, "LONGVITA_PLATFORM": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", os.environ.get("MASTER_PORT", "29533"), "-m", "megatron_longvita.train",
        "--config", os.path.join(REPO, "examples", "configs", "tiny_stage1.yaml"),
        "--train-iters", str(iterations), "--log-interval", "2",
        "--data-path", os.path.join(data, "mixture.yaml"), "--tokenizer-model", os.path.join(data, "tokenizer"),
    ]  # fmt: skip
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                env=env)  # fmt: skip
    ranks: list = []
    windows = []  # (arrival time, logged tokens/s, CPU seconds by rank)
    tail = []
    for line in launcher.stdout:
        tail = (tail + [line])[-40:]
        match = re.search(r'"tokens_per_s": ([0-9.]+)', line)
        if match:
            ranks = ranks or [child for child in psutil.Process(launcher.pid).children(recursive=True)
                              if "megatron_longvita.train" in " ".join(child.cmdline())]  # fmt: skip
            windows.append((time.perf_counter(), float(match.group(1)), process_cpu_seconds(ranks)))
    if launcher.wait():
        raise SystemExit("tiny training run failed:\n" + "".join(tail))
    if len(windows) < 3:
        raise SystemExit("tiny training run logged fewer than three tokens_per_s windows")
    tokens = busiest = 0.0
    for (before, _, cpu_before), (after, rate, cpu_after) in zip(windows[1:], windows[2:]):
        tokens += rate * (after - before)
        busiest += max(cpu_after[pid] - cpu_before[pid] for pid in cpu_after)
    return {"tokens_per_s": round(float(np.median([rate for _, rate, _ in windows[1:]])), 1),
            "tokens_per_cpu_s_busiest_rank": round(tokens / busiest, 1)}  # fmt: skip


def parquet_benchmark(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        mixture = build_parquet_corpus(root, args.parquet_rows, rng)
        tokenizer_dir = args.tokenizer or train_tokenizer(root)
        training = tiny_training_rates(root, args.train_iters)
        # the tiny quickstart's data settings (examples/configs/tiny_stage1.yaml): 56 px tiles, 4 tokens each
        tiny = DataConfig(mixture=mixture, tokenizer=tokenizer_dir, seq_length=256, pack_buffer_size=128,
                          media=MediaConfig(image_size=56, max_tiles=4, max_num_frames=4))  # fmt: skip
        full = dataclasses.replace(tiny, seq_length=args.seq_length, pack_buffer_size=256,
                                   media=MediaConfig(image_size=448, max_tiles=12, max_num_frames=128))  # fmt: skip
        tiny_rates = [loader_rate(dataclasses.replace(tiny, num_workers=w), args.tiny_batches) for w in (1, 2)]
        full_rates = [loader_rate(dataclasses.replace(full, num_workers=w), args.throughput_batches) for w in (1, 2)]
    print(json.dumps({
        "source": "parquet (LLaVA-OneVision layout, embedded JPEG, row groups of 100)",
        "rows": args.parquet_rows,
        "tiny_tp2_training": training,
        "tiny_tiles_56px": {
            "seq_length": 256, "loader": tiny_rates,
            "one_worker_over_training_wall": round(tiny_rates[0]["tokens_per_s"] / training["tokens_per_s"], 2),
            "one_worker_over_training_per_core": round(
                tiny_rates[0]["per_cpu_s_busiest_process"]["tokens"] / training["tokens_per_cpu_s_busiest_rank"], 2),
        },
        "tiles_448px": {"seq_length": args.seq_length, "loader": full_rates},
    }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=16384)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--pack-buffer-size", type=int, default=1024)
    parser.add_argument("--baseline-micro-batch", type=int, default=8)
    parser.add_argument("--throughput-batches", type=int, default=4)
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: a small BPE trained here)")
    parser.add_argument("--source", choices=("jsonl", "parquet"), default="jsonl")
    parser.add_argument("--parquet-rows", type=int, default=600)
    parser.add_argument("--tiny-batches", type=int, default=40, help="parquet: micro-batches timed at 56 px")
    parser.add_argument("--train-iters", type=int, default=12, help="parquet: tiny TP=2 training iterations")
    args = parser.parse_args()
    if args.source == "parquet":
        parquet_benchmark(args)
        return

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
