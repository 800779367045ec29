"""Minimal greedy generation from a torch_dist checkpoint at any TP / PP.

Re-runs the full forward (vision tower included) for every new token, with no KV cache:
a correctness reference for parity checks, not the serving engine.

    torchrun --nproc_per_node 2 -m megatron_longvita.generate --load CKPT --tp 2 --pp 1 \\
        --input-ids-file ids.json [--pixel-values-file pv.npy] --max-new-tokens 8 --greedy --output out.json

ids.json holds the expanded prompt's token ids (a JSON list); pv.npy holds the tiles
[num_tiles, 3, H, W] in placeholder order, as transformers' InternVL takes pixel_values. The
output JSON has the generated ids and the logits of the first generated position.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import MegatronModule

from megatron_longvita.checkpoint.convert import load_model_config
from megatron_longvita.checkpoint.dist import load_model
from megatron_longvita.config.parallel import ParallelConfig
from megatron_longvita.models.long_vita import gather_logits, long_vita_provider
from megatron_longvita.platform import destroy_distributed, initialize_distributed
from megatron_longvita.training.loop import build_model_chunks


@dataclass
class Generation:
    tokens: list[int]  # generated ids only
    first_logits: torch.Tensor  # [vocab] fp32: the logits that chose tokens[0]


def last_position_logits(chunks: list[MegatronModule], input_ids: torch.Tensor,
                         pixel_values: Optional[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Logits [vocab] at the last position of one sequence [1, s], identical on every rank."""
    seq_length = input_ids.shape[1]
    batch = {"tokens": input_ids, "position_ids": torch.arange(seq_length).unsqueeze(0), "pixel_values": pixel_values}

    def forward_step(data_iterator, model):
        data = next(data_iterator)
        return model(data["tokens"], data["position_ids"], None, pixel_values=data["pixel_values"]), None

    with torch.no_grad():
        outputs = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]),
                                              model=chunks, num_microbatches=1, seq_length=seq_length,
                                              micro_batch_size=1, forward_only=True)
    logits = torch.empty(vocab_size, dtype=torch.float32)
    if parallel_state.is_pipeline_last_stage():
        logits = gather_logits(outputs[0][0, -1], vocab_size).float()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(logits, parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return logits


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


def load_for_inference(load_dir: str, parallel: ParallelConfig) -> tuple[list[MegatronModule], int]:
    """Build the chunks of this rank at `parallel`, load the checkpoint; returns them and the vocab size."""
    config, dtype = load_model_config(load_dir)
    config.validate_parallel(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size)
    chunks = build_model_chunks(long_vita_provider(config, parallel, params_dtype=dtype))
    load_model(chunks, load_dir)
    for chunk in chunks:
        chunk.eval()
    return chunks, config.decoder.vocab_size


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="torch_dist checkpoint written by hf2mcore (or training)")
    parser.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1)
    parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    parser.add_argument("--input-ids-file", required=True, help="JSON list of prompt token ids")
    parser.add_argument("--pixel-values-file", default=None, help=".npy [num_tiles, 3, H, W]")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (the only mode implemented)")
    parser.add_argument("--eos-id", type=int, default=None)
    parser.add_argument("--output", required=True, help="JSON: generated ids and first-position logits")
    args = parser.parse_args(argv)
    if not args.greedy:
        parser.error("only greedy decoding is implemented: pass --greedy")
    with open(args.input_ids_file) as f:
        input_ids = json.load(f)
    pixel_values = torch.from_numpy(np.load(args.pixel_values_file)) if args.pixel_values_file else None
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    try:
        initialize_distributed(parallel)
        chunks, vocab_size = load_for_inference(args.load, parallel)
        result = greedy_generate(chunks, input_ids, pixel_values, args.max_new_tokens, vocab_size, args.eos_id)
        if dist.get_rank() == 0:
            with open(args.output, "w") as f:
                json.dump({"generated_ids": result.tokens, "first_logits": result.first_logits.tolist()}, f)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
