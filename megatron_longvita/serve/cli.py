"""OpenAI-compatible server over the context-parallel inference engine.

    torchrun --nproc_per_node 4 -m megatron_longvita.serve --load CKPT --tokenizer TOK --tp 2 --cp 2 \\
        [--host 127.0.0.1] [--port 8000] [--served-model-name long-vita] [--api-key KEY] \\
        [--allowed-media-root DIR] [--max-batch-size 8] [--max-model-len N]

Rank 0 serves HTTP (FastAPI + uvicorn in a thread); every rank runs the engine loop in its
main thread, rank 0 broadcasting each batch. SIGTERM (or Ctrl-C) finishes the running batch,
answers waiting requests with 503 and stops every rank.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from typing import Optional

import torch.distributed as dist

from megatron_longvita.checkpoint.model_config import load_model_config
from megatron_longvita.config.parallel import add_parallel_arguments, parallel_config_from_args
from megatron_longvita.inference import ROPE_SCALING_KINDS, RopeScaling, load_engine
from megatron_longvita.platform import destroy_distributed, initialize_distributed, setup_platform
from megatron_longvita.serve.ranks import ControlChannel, engine_loop

logger = logging.getLogger("megatron_longvita.serve")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="torch_dist checkpoint (hf2mcore or training)")
    parser.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory (tokenizer.json)")
    # TP x CP only: the server's per-step agreement runs on the cached decode path (no PP)
    add_parallel_arguments(parser, ("tensor_model_parallel_size", "context_parallel_size"))
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: local only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default="long-vita", help="the 'model' clients must name")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LONGVITA_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $LONGVITA_API_KEY, else none)",
    )
    parser.add_argument(
        "--allowed-media-root",
        default=None,
        help="directory local media paths may point into (default: base64 data URLs only)",
    )
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests per engine batch")
    parser.add_argument(
        "--batch-gather-ms",
        type=float,
        default=100.0,
        help="how long a short batch waits for requests being prepared and for the clients "
        "of the batch that just ended",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="prompt + generated tokens per request (default: the checkpoint's max positions)",
    )
    parser.add_argument("--max-num-frames", type=int, default=None, help="frames sampled per video by default")
    parser.add_argument("--max-request-bytes", type=int, default=64 * 2**20, help="request body limit")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--rope-scaling", choices=ROPE_SCALING_KINDS, default=None)
    parser.add_argument("--rope-scaling-factor", type=float, default=None)
    args = parser.parse_args(argv)
    if (args.rope_scaling is None) != (args.rope_scaling_factor is None):
        parser.error("--rope-scaling and --rope-scaling-factor go together")
    if args.max_batch_size < 1:
        parser.error("--max-batch-size must be >= 1")
    args.parallel = parallel_config_from_args(args)
    return args


def _max_model_len(args: argparse.Namespace, max_positions: int) -> int:
    limit = max_positions if args.rope_scaling is None else int(max_positions * args.rope_scaling_factor)
    if args.max_model_len is not None and args.max_model_len > limit:
        raise SystemExit(
            f"--max-model-len {args.max_model_len} exceeds the checkpoint's {max_positions} positions"
            + ("" if args.rope_scaling else " (extend them with --rope-scaling)")
        )
    return args.max_model_len or limit


def _start_http(args: argparse.Namespace, max_model_len: int, stopping: threading.Event):
    """Rank 0: the scheduler and the uvicorn server thread (started and listening on return)."""
    import uvicorn

    from megatron_longvita.config.tokens import CONTEXT_TOKENS
    from megatron_longvita.data import ChatTokenizer, MediaConfig
    from megatron_longvita.serve.app import Metrics, ServerOptions, build_app
    from megatron_longvita.serve.prompts import PromptBuilder
    from megatron_longvita.serve.scheduler import Scheduler

    model_config, _ = load_model_config(args.load)
    frames = {} if args.max_num_frames is None else {"max_num_frames": args.max_num_frames}
    missing = tuple(token for token in CONTEXT_TOKENS if token not in model_config.context_tokens)
    builder = PromptBuilder(
        ChatTokenizer.from_dir(args.tokenizer),
        MediaConfig.from_model_config(model_config, **frames),
        max_model_len,
        missing,
    )
    scheduler = Scheduler(args.max_batch_size, args.batch_gather_ms / 1e3)
    metrics = Metrics(scheduler)
    options = ServerOptions(
        args.served_model_name,
        args.api_key,
        args.allowed_media_root,
        args.max_request_bytes,
        args.request_timeout,
        max_model_len,
    )
    app = build_app(options, scheduler, builder, metrics, engine_alive=lambda: not stopping.is_set())
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    )
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    if not server.started:
        raise SystemExit(f"the HTTP server could not start on {args.host}:{args.port} (see the log above)")
    logger.info(
        "serving %r on http://%s:%d (TP=%d, CP=%d)",
        args.served_model_name,
        args.host,
        args.port,
        args.parallel.tensor_model_parallel_size,
        args.parallel.context_parallel_size,
    )
    return builder, scheduler, metrics, server, thread


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    parallel = args.parallel
    platform = setup_platform()
    try:
        initialize_distributed(parallel, platform=platform)
        rope = RopeScaling(args.rope_scaling, args.rope_scaling_factor) if args.rope_scaling else None
        engine = load_engine(args.load, parallel, rope, platform)
        channel = ControlChannel()
        model_config, _ = load_model_config(args.load)
        max_model_len = _max_model_len(args, model_config.decoder.max_position_embeddings)
        if dist.get_rank() != 0:
            engine_loop(engine, channel, None, 0, 0, stopping=stopping.is_set)
        else:
            builder, scheduler, metrics, server, thread = _start_http(args, max_model_len, stopping)
            tokenizer = builder.tokenizer
            try:
                engine_loop(
                    engine,
                    channel,
                    scheduler,
                    tokenizer.ids["<|im_end|>"],
                    tokenizer.pad_id,
                    stopping=lambda: stopping.is_set() or not thread.is_alive(),
                    on_batch=metrics.batch_size.observe,
                    on_step=metrics.decode_steps.inc,
                )
            finally:
                stopping.set()
                for job in scheduler.close():
                    job.fail(503, "the server is shutting down")
                server.should_exit = True
                thread.join(timeout=10)
        logger.info("stopped cleanly")
    finally:
        destroy_distributed()
