"""Serving throughput: 32 chat requests sent one at a time vs from 8 concurrent clients, same server.

    .venv/bin/python tools/benchmarks/serve.py [--cp 2] [--tp 1] [--requests 32] [--clients 8] \\
        [--max-tokens 32] [--load CKPT --tokenizer TOK]

Starts ``torchrun -m megatron_longvita.serve`` on 127.0.0.1 (by default on a random-weight
tiny InternVL converted like the tests' model, with the tests' tiny tokenizer), warms it up,
then sends the same image + text chat (greedy, ``ignore_eos`` so every answer has
``--max-tokens`` tokens) through the official ``openai`` client: first sequentially, then
from ``--clients`` threads. Prints one JSON line: generated tokens/s, p50/p99 latency and
failures per phase, the concurrent/sequential throughput ratio and the engine's batch sizes
(from /metrics).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root

from tests.harness import free_port, run_distributed  # noqa: E402

MODEL = "long-vita"


def tiny_checkpoint(directory: str) -> tuple[str, str]:
    from tests.distributed.test_inference import tiny_chat_tokenizer
    from tests.distributed.test_model_parity import hf2mcore_rank, save_tiny_internvl

    save_tiny_internvl(os.path.join(directory, "hf"))
    run_distributed(hf2mcore_rank, 1, os.path.join(directory, "hf"), os.path.join(directory, "mcore"))
    return os.path.join(directory, "mcore"), tiny_chat_tokenizer(directory)


def start_server(args: argparse.Namespace, load: str, tokenizer: str, log_path: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(args.tp * args.cp),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "megatron_longvita.serve",
        "--load",
        load,
        "--tokenizer",
        tokenizer,
        "--tp",
        str(args.tp),
        "--cp",
        str(args.cp),
        "--port",
        str(port),
        "--served-model-name",
        MODEL,
        "--max-batch-size",
        str(args.clients),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(command, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited ({process.returncode}); see {log_path}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(1)
    process.kill()
    raise SystemExit(f"the server did not come up; see {log_path}")


def image_data_url() -> str:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(60, 90, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def run_phase(url: str, requests: int, clients: int, max_tokens: int, image: str) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "text", "text": "what is shown in the image"},
            ],
        }
    ]

    def one(_: int) -> tuple[float, int]:
        start = time.perf_counter()
        response = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
        )
        return time.perf_counter() - start, response.usage.completion_tokens

    latencies, tokens, failures = [], 0, 0
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(one, i) for i in range(requests)]:
            try:
                latency, generated = future.result()
            except Exception as error:  # noqa: BLE001 - counted and reported
                failures += 1
                print(f"request failed: {error!r}", file=sys.stderr)
                continue
            latencies.append(latency)
            tokens += generated
    wall = time.perf_counter() - start
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {
        "requests": requests,
        "clients": clients,
        "failed": failures,
        "wall_s": round(wall, 3),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "latency_p50_s": round(quantiles[49], 3),
        "latency_p99_s": round(quantiles[98], 3),
    }


def batch_sizes(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    values = {
        name: float(re.search(rf"^longvita_batch_size_{name} ([0-9.e+]+)$", text, re.M).group(1))
        for name in ("count", "sum")
    }
    return {"batches": int(values["count"]), "mean_batch_size": round(values["sum"] / max(values["count"], 1), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--load", help="checkpoint (default: a random tiny InternVL)")
    parser.add_argument("--tokenizer", help="tokenizer directory (with --load)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as scratch:
        load, tokenizer = (args.load, args.tokenizer) if args.load else tiny_checkpoint(scratch)
        process, url = start_server(args, load, tokenizer, os.path.join(scratch, "server.log"))
        try:
            image = image_data_url()
            run_phase(url, 4, 1, args.max_tokens, image)  # warm-up
            sequential = run_phase(url, args.requests, 1, args.max_tokens, image)
            before = batch_sizes(url)
            concurrent_ = run_phase(url, args.requests, args.clients, args.max_tokens, image)
            after = batch_sizes(url)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(120)
    batches = after["batches"] - before["batches"]
    result = {
        "model": "tiny" if not args.load else args.load,
        "tp": args.tp,
        "cp": args.cp,
        "max_tokens": args.max_tokens,
        "sequential": sequential,
        "concurrent": concurrent_,
        "concurrent_batches": batches,
        "concurrent_mean_batch_size": round(args.requests / max(batches, 1), 2),
        "throughput_ratio": round(concurrent_["tokens_per_s"] / sequential["tokens_per_s"], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
