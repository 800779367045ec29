"""Generation from a torch_dist checkpoint: the context-parallel inference engine's CLI.

At TP x CP the engine prefills once (vision tower included) and decodes over a KV cache
sharded across the CP ranks; ``--decode-mode fixed-length`` re-runs the whole fixed-length
forward per token instead (the paper's method, for comparison). With ``--pp > 1`` the
prompt is re-run whole per token through the pipeline schedule (greedy only).

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
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import MegatronModule

from megatron_longvita.checkpoint.model_config import load_model_config
from megatron_longvita.config.parallel import ParallelConfig
from megatron_longvita.inference import (
    DECODE_MODES,
    ROPE_SCALING_KINDS,
    Generation,
    GenerationConfig,
    Prompt,
    RopeScaling,
    SamplingConfig,
    load_engine,
    load_for_inference,
)
from megatron_longvita.models.long_vita import gather_logits
from megatron_longvita.platform import destroy_distributed, initialize_distributed

__all__ = ["greedy_generate", "last_position_logits", "load_for_inference", "main"]


def last_position_logits(chunks: list[MegatronModule], input_ids: torch.Tensor,
                         pixel_values: Optional[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Logits [vocab] (on the CPU) at the last position of one sequence [1, s], identical on every rank."""
    seq_length, device = input_ids.shape[1], next(chunks[0].parameters()).device
    batch = {"tokens": input_ids.to(device), "position_ids": torch.arange(seq_length, device=device).unsqueeze(0),
             "pixel_values": None if pixel_values is None else pixel_values.to(device)}

    def forward_step(data_iterator, model):
        data = next(data_iterator)
        return model(data["tokens"], data["position_ids"], None, pixel_values=data["pixel_values"]), None

    with torch.no_grad():
        outputs = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]),
                                              model=chunks, num_microbatches=1, seq_length=seq_length,
                                              micro_batch_size=1, forward_only=True)
    logits = torch.empty(vocab_size, dtype=torch.float32, device=device)
    if parallel_state.is_pipeline_last_stage():
        logits = gather_logits(outputs[0][0, -1], vocab_size).float()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(logits, parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return logits.cpu()


def greedy_generate(chunks: list[MegatronModule], input_ids: list[int], pixel_values: Optional[torch.Tensor],
                    max_new_tokens: int, vocab_size: int, eos_id: Optional[int] = None) -> Generation:
    tokens = list(input_ids)
    generated: list[int] = []
    first_logits = None
    for _ in range(max_new_tokens):
        logits = last_position_logits(chunks, torch.tensor([tokens]), pixel_values, vocab_size)
        first_logits = logits if first_logits is None else first_logits
        next_id = int(logits.argmax())
        generated.append(next_id)
        tokens.append(next_id)
        if next_id == eos_id:
            break
    return Generation(generated, first_logits)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="torch_dist checkpoint written by hf2mcore (or training)")
    parser.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1)
    parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    parser.add_argument("--cp", "--context-parallel-size", dest="cp", type=int, default=1)
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
    parser.add_argument("--decode-mode", choices=DECODE_MODES, default="cached",
                        help="cached: KV cache sharded over CP; fixed-length: the paper's re-prefill per token")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (the default; overrides sampling)")
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0 samples; 0 is greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--eos-id", "--stop-token-id", dest="stop_ids", type=int, action="append", default=[],
                        help="stop token id; repeatable (with --tokenizer, <|im_end|> always stops)")
    parser.add_argument("--rope-scaling", choices=ROPE_SCALING_KINDS, default=None)
    parser.add_argument("--rope-scaling-factor", type=float, default=None)
    parser.add_argument("--rope-original-max-position-embeddings", type=int, default=None,
                        help="YaRN: the trained context (default: the checkpoint's max_position_embeddings)")
    parser.add_argument("--stream", action="store_true", help="print tokens (text, with --tokenizer) as they come")
    parser.add_argument("--output", help="JSON: generated ids (+ text) and first-position logits")
    args = parser.parse_args(argv)
    if args.prompt is not None and args.tokenizer is None:
        parser.error("--prompt needs --tokenizer (the chat template)")
    if (args.image or args.video) and args.prompt is None:
        parser.error("--image / --video go with --prompt; with --input-ids-file pass --pixel-values-file")
    if (args.rope_scaling is None) != (args.rope_scaling_factor is None):
        parser.error("--rope-scaling and --rope-scaling-factor go together")
    if args.pp > 1 and (args.cp > 1 or args.temperature > 0 or args.rope_scaling or args.decode_mode != "cached"):
        parser.error("with --pp > 1 only greedy full re-forward decoding is available: use --pp 1 for --cp, "
                     "sampling, --rope-scaling and --decode-mode")
    return args


def build_prompt(args: argparse.Namespace):
    """(Prompt, ChatTokenizer or None) from the ids file or the chat template."""
    if args.input_ids_file is not None:
        with open(args.input_ids_file) as f:
            ids = json.load(f)
        pixel_values = torch.from_numpy(np.load(args.pixel_values_file)) if args.pixel_values_file else None
        return Prompt(ids, pixel_values), None
    from megatron_longvita.data import ChatTokenizer, MediaConfig
    from megatron_longvita.data.prompt import build_inference_prompt
    from megatron_longvita.config.tokens import CONTEXT_TOKENS, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

    tokenizer = ChatTokenizer.from_dir(args.tokenizer)
    model_config, _ = load_model_config(args.load)
    lacking = [token for token in CONTEXT_TOKENS if token not in model_config.context_tokens]
    if (args.image or args.video) and lacking:  # e.g. an InternVL conversion: every tile on <IMG_CONTEXT>
        raise SystemExit(f"error: the model in {args.load} defines no {', '.join(lacking)}, which --prompt's "
                         "Long-VITA media layout needs; pass --input-ids-file and --pixel-values-file instead")
    overrides = {} if args.max_num_frames is None else {"max_num_frames": args.max_num_frames}
    media = MediaConfig.from_model_config(model_config, **overrides)
    text = args.prompt
    for placeholder, paths in ((VIDEO_PLACEHOLDER, args.video), (IMAGE_PLACEHOLDER, args.image)):
        if paths and placeholder not in text:
            text = f"{placeholder}\n" * len(paths) + text
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": text}]
    built = build_inference_prompt(messages, tokenizer, media, images=args.image, videos=args.video)
    pixel_values = built.pixel_values if len(built.pixel_values) else None
    return Prompt(built.tokens[0].tolist(), pixel_values), tokenizer


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
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    prompt, tokenizer = build_prompt(args)
    stop_ids = tuple(args.stop_ids) + ((tokenizer.ids["<|im_end|>"],) if tokenizer is not None else ())
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                              context_parallel_size=args.cp)
    try:
        initialize_distributed(parallel)
        if args.pp > 1:
            chunks, vocab_size = load_for_inference(args.load, parallel)
            result = greedy_generate(chunks, prompt.tokens, prompt.pixel_values, args.max_new_tokens, vocab_size,
                                     stop_ids[0] if stop_ids else None)
        else:
            rope = (RopeScaling(args.rope_scaling, args.rope_scaling_factor,
                                args.rope_original_max_position_embeddings) if args.rope_scaling else None)
            engine = load_engine(args.load, parallel, rope)
            sampling = SamplingConfig(0.0 if args.greedy else args.temperature, args.top_k, args.top_p, args.seed)
            config = GenerationConfig(args.max_new_tokens, sampling, stop_ids, args.decode_mode,
                                      tokenizer.pad_id if tokenizer is not None else 0)
            stream = TextStream(tokenizer, stop_ids) if args.stream and dist.get_rank() == 0 else None
            [result] = engine.generate([prompt], config, on_tokens=stream)
            if stream is not None:
                print(flush=True)
            if dist.get_rank() == 0:
                print(f"prefill {engine.timing.prefill_s:.3f} s, decode {engine.timing.per_token_s * 1e3:.2f} "
                      f"ms/token ({args.decode_mode})", file=sys.stderr)
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
