"""Generation from a torch_dist checkpoint: the context-parallel inference engine's CLI.

At TP x CP the engine prefills once (vision tower included) and decodes over a KV cache
sharded across the CP ranks; ``--decode-mode fixed-length`` re-runs the whole fixed-length
forward per token instead (the paper's method, for comparison). With ``--pp > 1`` (no CP)
fixed-length is the mode, each forward running through the pipeline schedule.

    torchrun --nproc_per_node 4 -m megatron_longvita.generate --load CKPT --tp 2 --cp 2 \\
        --tokenizer TOK --prompt "Describe the image." --image a.jpg --max-new-tokens 64 --stream
    torchrun --nproc_per_node 2 -m megatron_longvita.generate --load CKPT --tp 2 --pp 1 \\
        --input-ids-file ids.json [--pixel-values-file pv.npy] --max-new-tokens 8 --greedy --output out.json

ids.json holds the expanded prompt's token ids (a JSON list); pv.npy holds the tiles
[num_tiles, 3, H, W] in placeholder order, as transformers' InternVL takes pixel_values. With
--prompt (needs --tokenizer) the chat template builds both, an ``<image>`` / ``<video>``
placeholder per --image / --video being prepended where the text has none. The output JSON
has the generated ids (and text, with a tokenizer) and the logits of the first generated
position.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_longvita.checkpoint.model_config import load_model_config
from megatron_longvita.config.parallel import add_parallel_arguments, parallel_config_from_args
from megatron_longvita.inference import (
    DECODE_MODES,
    ROPE_SCALING_KINDS,
    GenerationConfig,
    GenerationRequest,
    RopeScaling,
    SamplingConfig,
    load_engine,
)
from megatron_longvita.platform import destroy_distributed, initialize_distributed, setup_platform

__all__ = ["main"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="torch_dist checkpoint written by hf2mcore (or training)")
    add_parallel_arguments(
        parser, ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size")
    )
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--input-ids-file", help="JSON list of expanded prompt token ids")
    prompt.add_argument("--prompt", help="user message, put through the chat template (needs --tokenizer)")
    parser.add_argument("--pixel-values-file", default=None, help=".npy [num_tiles, 3, H, W] (with --input-ids-file)")
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer directory (tokenizer.json)")
    parser.add_argument("--system", help="system message for --prompt")
    parser.add_argument("--image", action="append", default=[], help="image file for --prompt; repeatable")
    parser.add_argument("--video", action="append", default=[], help="video file or frame directory; repeatable")
    parser.add_argument("--max-num-frames", type=int, default=None, help="frames sampled per video")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--decode-mode",
        choices=DECODE_MODES,
        default=None,
        help="cached (default; KV cache sharded over CP) or fixed-length (the paper's re-prefill "
        "per token; the default and only mode with --pp > 1)",
    )
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (the default; overrides sampling)")
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0 samples; 0 is greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--eos-id",
        "--stop-token-id",
        dest="stop_ids",
        type=int,
        action="append",
        default=[],
        help="stop token id; repeatable (with --tokenizer, <|im_end|> always stops)",
    )
    parser.add_argument("--rope-scaling", choices=ROPE_SCALING_KINDS, default=None)
    parser.add_argument("--rope-scaling-factor", type=float, default=None)
    parser.add_argument(
        "--rope-original-max-position-embeddings",
        type=int,
        default=None,
        help="YaRN: the trained context (default: the checkpoint's max_position_embeddings)",
    )
    parser.add_argument("--stream", action="store_true", help="print tokens (text, with --tokenizer) as they come")
    parser.add_argument("--output", help="JSON: generated ids (+ text) and first-position logits")
    args = parser.parse_args(argv)
    if args.prompt is not None and args.tokenizer is None:
        parser.error("--prompt needs --tokenizer (the chat template)")
    if (args.image or args.video) and args.prompt is None:
        parser.error("--image / --video go with --prompt; with --input-ids-file pass --pixel-values-file")
    if (args.rope_scaling is None) != (args.rope_scaling_factor is None):
        parser.error("--rope-scaling and --rope-scaling-factor go together")
    args.parallel = parallel_config_from_args(args)
    pipelined = args.parallel.pipeline_model_parallel_size > 1
    if args.decode_mode is None:
        args.decode_mode = "fixed-length" if pipelined else "cached"
    if pipelined and (args.parallel.context_parallel_size > 1 or args.rope_scaling or args.decode_mode == "cached"):
        parser.error(
            "with --pp > 1 decoding is fixed-length through the pipeline: use --pp 1 for --cp, "
            "--rope-scaling and --decode-mode cached"
        )
    return args


def build_prompt(args: argparse.Namespace):
    """(GenerationRequest, ChatTokenizer or None) from the ids file or the chat template."""
    if args.input_ids_file is not None:
        with open(args.input_ids_file) as f:
            ids = json.load(f)
        pixel_values = torch.from_numpy(np.load(args.pixel_values_file)) if args.pixel_values_file else None
        return GenerationRequest(ids, pixel_values), None
    from megatron_longvita.config.tokens import CONTEXT_TOKENS, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
    from megatron_longvita.data import ChatTokenizer, MediaConfig
    from megatron_longvita.data.prompt import build_inference_prompt

    tokenizer = ChatTokenizer.from_dir(args.tokenizer)
    model_config, _ = load_model_config(args.load)
    lacking = [token for token in CONTEXT_TOKENS if token not in model_config.context_tokens]
    if (args.image or args.video) and lacking:  # e.g. an InternVL conversion: every tile on <IMG_CONTEXT>
        raise SystemExit(
            f"error: the model in {args.load} defines no {', '.join(lacking)}, which --prompt's "
            "Long-VITA media layout needs; pass --input-ids-file and --pixel-values-file instead"
        )
    overrides = {} if args.max_num_frames is None else {"max_num_frames": args.max_num_frames}
    media = MediaConfig.from_model_config(model_config, **overrides)
    text = args.prompt
    for placeholder, paths in ((VIDEO_PLACEHOLDER, args.video), (IMAGE_PLACEHOLDER, args.image)):
        if paths and placeholder not in text:
            text = f"{placeholder}\n" * len(paths) + text
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": text}
    ]
    built = build_inference_prompt(messages, tokenizer, media, images=args.image, videos=args.video)
    pixel_values = built.pixel_values if len(built.pixel_values) else None
    return GenerationRequest(built.tokens[0].tolist(), pixel_values), tokenizer


class TextStream:
    """Prints the decoded text as tokens arrive (ids without a tokenizer), on one rank."""

    def __init__(self, tokenizer, stop_ids: tuple[int, ...]) -> None:
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, new: list[Optional[int]]) -> None:
        token = new[0]
        if token is None or token in self.stop_ids:
            return
        self.ids.append(token)
        if self.tokenizer is None:
            print(token, end=" ", flush=True)
            return
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(self.printed) :], end="", flush=True)
            self.printed = text


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    prompt, tokenizer = build_prompt(args)
    stop_ids = tuple(args.stop_ids) + ((tokenizer.ids["<|im_end|>"],) if tokenizer is not None else ())
    platform = setup_platform()
    try:
        initialize_distributed(args.parallel, platform=platform)
        rope = (
            RopeScaling(args.rope_scaling, args.rope_scaling_factor, args.rope_original_max_position_embeddings)
            if args.rope_scaling
            else None
        )
        engine = load_engine(args.load, args.parallel, rope, platform)
        sampling = SamplingConfig(0.0 if args.greedy else args.temperature, args.top_k, args.top_p, args.seed)
        config = GenerationConfig(
            args.max_new_tokens, sampling, stop_ids, args.decode_mode, tokenizer.pad_id if tokenizer is not None else 0
        )
        stream = TextStream(tokenizer, stop_ids) if args.stream and dist.get_rank() == 0 else None
        [result] = engine.generate([prompt], config, on_tokens=stream)
        if stream is not None:
            print(flush=True)
        if dist.get_rank() == 0:
            print(
                f"prefill {engine.timing.prefill_s:.3f} s, decode {engine.timing.per_token_s * 1e3:.2f} "
                f"ms/token ({args.decode_mode})",
                file=sys.stderr,
            )
        if dist.get_rank() == 0 and args.output:
            output = {"generated_ids": result.tokens, "first_logits": result.first_logits.tolist()}
            if tokenizer is not None:
                output["text"] = tokenizer.decode([t for t in result.tokens if t not in stop_ids])
            with open(args.output, "w") as f:
                json.dump(output, f)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
