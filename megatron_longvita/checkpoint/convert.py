"""HF <-> megatron-core (torch_dist) conversion through the registered checkpoint formats.

hf2mcore builds the unsharded (TP=1, PP=1) model in one process, fills it through the format's
rows and saves a torch_dist checkpoint with its model config and tokenizer; dist_checkpointing
reshards it on load, so the result loads at any TP/PP. mcore2hf loads any checkpoint at TP=1,
PP=1 and writes a complete HF model directory (config, tokenizer, generation config, shards).

    python tools/convert_checkpoint.py hf2mcore --hf-dir HF --save-dir OUT [--vision-hf-dir VIT] [--tp N --pp N]
    python tools/convert_checkpoint.py mcore2hf --load-dir OUT --save-dir HF --format longvita|internvl|qwen2
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_longvita.checkpoint.dist import latest_checkpoint_dir, load_model, save_model
from megatron_longvita.checkpoint.formats import CHECKPOINT_FORMATS, CheckpointFormat, ConversionError, format_of
from megatron_longvita.checkpoint.hf import HFCheckpoint, save_hf_checkpoint
from megatron_longvita.checkpoint.mapping import mappings
from megatron_longvita.checkpoint.model_config import TOKENIZER_DIR, load_model_config, save_model_config
from megatron_longvita.checkpoint.tokenizer import HFTokenizer, TokenizerError
from megatron_longvita.config.parallel import ParallelConfig, add_parallel_arguments, parallel_config_from_args
from megatron_longvita.models.long_vita import LongVitaModel, build_long_vita
from megatron_longvita.models.presets import ModelConfig
from megatron_longvita.platform import initialize_distributed, setup_platform

__all__ = ["ConversionError", "hf2mcore", "mcore2hf", "main"]


def hf_to_mcore(
    checkpoint: HFCheckpoint, fmt: CheckpointFormat, config: ModelConfig, expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Megatron tensors from HF ones; every HF tensor must be used, every shape must match."""
    rows = mappings(fmt.layouts, config, list(expected), checkpoint.keys())
    converted, used = {}, set()
    for row in tqdm(rows, desc=f"hf2mcore {fmt.name}", unit="tensor", leave=False):
        shapes = [t.shape for t in row.transform.to_hf(expected[row.mcore].to("meta"))]
        tensors = []
        for name, shape in zip(row.hf, shapes):
            if name not in checkpoint:
                raise ConversionError(f"{checkpoint.directory}: missing tensor {name} (for {row.mcore})")
            found = checkpoint.shape(name)
            if found != tuple(shape):
                raise ConversionError(
                    f"{checkpoint.directory}: tensor {name} has shape {list(found)}, "
                    f"expected {list(shape)} (for {row.mcore})"
                )
            tensors.append(checkpoint.get(name))
        converted[row.mcore] = row.transform.to_mcore(tensors)
        used.update(row.hf)
    extra = sorted(set(checkpoint.keys()) - used)
    if extra:
        raise ConversionError(
            f"{checkpoint.directory}: {len(extra)} tensor(s) the {fmt.name} format does not map, "
            f"e.g. {', '.join(extra[:5])}"
        )
    return converted


def mcore_to_hf(state: dict[str, torch.Tensor], fmt: CheckpointFormat, config: ModelConfig) -> dict[str, torch.Tensor]:
    tensors = {}
    for row in tqdm(
        mappings(fmt.layouts, config, list(state)), desc=f"mcore2hf {fmt.name}", unit="tensor", leave=False
    ):
        tensors.update(zip(row.hf, row.transform.to_hf(state[row.mcore])))
    return tensors


def _single_process_setup() -> None:
    """A one-rank gloo group when not launched by torchrun; the unsharded model needs no more."""
    if not dist.is_initialized() and "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    initialize_distributed(ParallelConfig())


def _model_state(model: LongVitaModel) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in model.state_dict().items() if not name.endswith("_extra_state")}


def _build_unsharded(config: ModelConfig, dtype: torch.dtype) -> LongVitaModel:
    # Local specs: the table uses their names, and torch_dist keys are the TE ones either way.
    return build_long_vita(
        config, ParallelConfig(), params_dtype=dtype, layer_spec="local", vision_layer_spec="vision_local"
    )


def hf2mcore(
    hf_dir: str,
    save_dir: str,
    fmt: Optional[str] = None,
    vision_hf_dir: Optional[str] = None,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    tokenizer_dir: Optional[str] = None,
) -> ModelConfig:
    """Convert; the format comes from config.json's model_type unless named, token ids from the
    tokenizer files (`tokenizer_dir`, default the checkpoint's own)."""
    checkpoint = HFCheckpoint(hf_dir)
    source_format = CHECKPOINT_FORMATS.get(fmt) if fmt else format_of(checkpoint.config, hf_dir)
    vision_checkpoint = HFCheckpoint(vision_hf_dir) if vision_hf_dir else None
    if source_format.name != "qwen2" and vision_checkpoint:
        raise ConversionError(f"--vision-hf-dir goes with a text-only qwen2 --hf-dir, not {source_format.name}")
    tokenizer = HFTokenizer(tokenizer_dir or hf_dir)
    config = source_format.read_config(checkpoint, tokenizer, vision_checkpoint)
    config.validate_parallel(tensor_model_parallel_size, pipeline_model_parallel_size)
    dtype = checkpoint.get(checkpoint.keys()[0]).dtype
    _single_process_setup()
    model = _build_unsharded(config, dtype)
    state = _model_state(model)
    sources = [(checkpoint, source_format)]
    if vision_checkpoint:
        sources.append((vision_checkpoint, CHECKPOINT_FORMATS.get("internvit")))
    with torch.no_grad():
        for source, source_fmt in sources:
            for name, tensor in hf_to_mcore(source, source_fmt, config, state).items():
                state[name].copy_(tensor)
    save_model([model], save_dir)
    if dist.get_rank() == 0:
        save_model_config(save_dir, config, dtype, tokenizer)
    return config


def mcore2hf(
    load_dir: str, save_dir: str, fmt: str, max_shard_bytes: int = 5 * 2**30, tokenizer_dir: Optional[str] = None
) -> None:
    """Export a converted or trained checkpoint (its latest iteration) as a complete HF directory."""
    source = latest_checkpoint_dir(load_dir) or load_dir
    config, dtype = load_model_config(source)
    tokenizer = HFTokenizer(tokenizer_dir or os.path.join(source, TOKENIZER_DIR))
    target_format = CHECKPOINT_FORMATS.get(fmt)
    hf_config = target_format.write_config(config, dtype, tokenizer)  # refuses before the weights are read
    _single_process_setup()
    model = _build_unsharded(config, dtype)
    load_model([model], source)
    tensors = mcore_to_hf(_model_state(model), target_format, config)
    if dist.get_rank() == 0:
        save_hf_checkpoint(save_dir, hf_config, tensors, max_shard_bytes)
        tokenizer.save(save_dir)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_mcore = commands.add_parser("hf2mcore", help="HF safetensors -> megatron-core torch_dist")
    to_mcore.add_argument("--hf-dir", required=True)
    to_mcore.add_argument("--save-dir", required=True)
    standalone = [name for name in CHECKPOINT_FORMATS.names() if CHECKPOINT_FORMATS.get(name).standalone]
    to_mcore.add_argument(
        "--format", choices=standalone, default=None, help="source format (default: from config.json model_type)"
    )
    to_mcore.add_argument(
        "--vision-hf-dir", default=None, help="InternViT checkpoint for the vision tower of a text-only qwen2 --hf-dir"
    )
    to_mcore.add_argument(
        "--tokenizer", default=None, help="tokenizer directory whose tokens fix the placeholder ids (default: --hf-dir)"
    )
    add_parallel_arguments(
        to_mcore,
        ("tensor_model_parallel_size", "pipeline_model_parallel_size"),
        help={"tensor_model_parallel_size": "check the model builds at this layout (torch_dist loads at any layout)"},
    )
    to_hf = commands.add_parser("mcore2hf", help="megatron-core torch_dist -> HF safetensors")
    to_hf.add_argument("--load-dir", required=True)
    to_hf.add_argument("--save-dir", required=True)
    to_hf.add_argument("--format", choices=standalone, required=True)
    to_hf.add_argument("--max-shard-size-gb", type=float, default=5.0)
    to_hf.add_argument(
        "--tokenizer", default=None, help="tokenizer directory to export (default: the one the checkpoint carries)"
    )
    args = parser.parse_args(argv)
    setup_platform()
    try:
        if args.command == "hf2mcore":
            parallel = parallel_config_from_args(args)
            hf2mcore(
                args.hf_dir,
                args.save_dir,
                args.format,
                args.vision_hf_dir,
                parallel.tensor_model_parallel_size,
                parallel.pipeline_model_parallel_size,
                args.tokenizer,
            )
        else:
            mcore2hf(args.load_dir, args.save_dir, args.format, int(args.max_shard_size_gb * 2**30), args.tokenizer)
    except (ConversionError, TokenizerError) as error:
        parser.exit(2, f"error: {error}\n")
    finally:
        from megatron_longvita.platform import destroy_distributed

        destroy_distributed()


if __name__ == "__main__":
    main()
