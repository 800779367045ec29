"""HF <-> megatron-core (torch_dist) conversion, driven by the table in checkpoint/mapping.py.

hf2mcore builds the unsharded (TP=1, PP=1) model in one process, fills it through the table
and saves a torch_dist checkpoint; dist_checkpointing reshards it on load, so the result
loads at any TP/PP. mcore2hf loads any checkpoint at TP=1, PP=1 and maps back.

    python tools/convert_checkpoint.py hf2mcore --hf-dir HF --save-dir OUT [--tp N --pp N]
    python tools/convert_checkpoint.py mcore2hf --load-dir OUT --save-dir HF --format internvl|longvita
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_longvita.checkpoint.dist import load_model, save_model
from megatron_longvita.checkpoint.hf import HFCheckpoint, save_hf_checkpoint
from megatron_longvita.checkpoint.mapping import mappings
from megatron_longvita.checkpoint.model_config import load_model_config, save_model_config
from megatron_longvita.config.parallel import ParallelConfig, add_parallel_arguments, parallel_config_from_args
from megatron_longvita.models.decoder import DecoderConfig
from megatron_longvita.models.long_vita import LongVitaModel, build_long_vita
from megatron_longvita.models.presets import ModelConfig
from megatron_longvita.models.projector import ProjectorConfig
from megatron_longvita.models.vision import VisionConfig
from megatron_longvita.platform import initialize_distributed, setup_platform

MODEL_TYPES = {"internvl": "internvl", "long_vita": "longvita", "qwen2": "qwen2", "intern_vit_6b": "internvit"}


class ConversionError(ValueError):
    """A checkpoint that does not fit the model: names the tensor or config field."""


# Our config field -> HF config key, per config flavour (both directions use these).
DECODER_KEYS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
                "ffn_hidden_size": "intermediate_size", "num_attention_heads": "num_attention_heads",
                "num_query_groups": "num_key_value_heads", "vocab_size": "vocab_size",
                "max_position_embeddings": "max_position_embeddings", "norm_epsilon": "rms_norm_eps",
                "tie_embeddings": "tie_word_embeddings"}
VISION_KEYS = {
    "internvl": {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
                 "ffn_hidden_size": "intermediate_size", "num_attention_heads": "num_attention_heads",
                 "image_size": "image_size", "patch_size": "patch_size", "num_channels": "num_channels",
                 "norm_epsilon": "layer_norm_eps", "qkv_bias": "attention_bias",
                 "layer_scale_init": "layer_scale_init_value"},
    "internvit": {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
                  "ffn_hidden_size": "intermediate_size", "num_attention_heads": "num_attention_heads",
                  "image_size": "image_size", "patch_size": "patch_size", "num_channels": "num_channels",
                  "norm_epsilon": "layer_norm_eps", "qkv_bias": "qkv_bias", "layer_scale_init": "initializer_factor"},
}
# HF settings whose other values this model does not implement.
VISION_REQUIRED = {
    "internvl": {"norm_type": "layer_norm", "use_qk_norm": False, "hidden_act": "gelu", "use_mean_pooling": True,
                 "use_absolute_position_embeddings": True},
    "internvit": {"norm_type": "layer_norm", "qk_normalization": False, "hidden_act": "gelu"},
}
INTERNVL_REQUIRED = {"projector_hidden_act": "gelu", "vision_feature_layer": -1,
                     "vision_feature_select_strategy": "default"}


def _require(section: str, hf: dict, required: dict[str, Any]) -> None:
    for key, value in required.items():
        if key in hf and hf[key] != value:
            raise ConversionError(f"{section}.{key} = {hf[key]!r} is not supported (only {value!r})")


def _side(value: Any) -> int:
    return value[0] if isinstance(value, (list, tuple)) else value


def _decoder_from_hf(text: dict) -> DecoderConfig:
    fields = {ours: text[theirs] for ours, theirs in DECODER_KEYS.items() if theirs in text}
    rope = (text.get("rope_parameters") or {}).get("rope_theta", text.get("rope_theta"))
    return DecoderConfig(**fields, **({"rotary_base": float(rope)} if rope is not None else {}))


def _decoder_to_hf(decoder: DecoderConfig) -> dict:
    hf = {theirs: getattr(decoder, ours) for ours, theirs in DECODER_KEYS.items()}
    return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **hf, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": decoder.rotary_base}}


def _vision_from_hf(vision: dict, flavour: str) -> VisionConfig:
    _require("vision_config", vision, VISION_REQUIRED[flavour])
    fields = {ours: vision[theirs] for ours, theirs in VISION_KEYS[flavour].items() if theirs in vision}
    for key in ("image_size", "patch_size"):
        if key in fields:
            fields[key] = _side(fields[key])
    return VisionConfig(**fields)


def _vision_to_hf(vision: VisionConfig, flavour: str) -> dict:
    return {**{theirs: getattr(vision, ours) for ours, theirs in VISION_KEYS[flavour].items()},
            **VISION_REQUIRED[flavour]}


def model_config_from_hf(checkpoint: HFCheckpoint, fmt: str, vision_checkpoint: Optional[HFCheckpoint] = None,
                         image_token_id: Optional[int] = None) -> ModelConfig:
    """The model an HF checkpoint describes; `image_token_id` only for a text-only qwen2 start."""
    hf = checkpoint.config
    if fmt == "internvl":
        _require("config", hf, INTERNVL_REQUIRED)
        text = {**hf["text_config"], "tie_word_embeddings": hf.get("tie_word_embeddings", False)}
        return ModelConfig(decoder=_decoder_from_hf(text), vision=_vision_from_hf(hf["vision_config"], "internvl"),
                           projector=ProjectorConfig(downsample_ratio=hf.get("downsample_ratio", 0.5), bias=True),
                           image_token_id=hf["image_token_id"])
    if fmt == "longvita":
        bias = "model.vision_projection.mlp.0.bias" in checkpoint
        return ModelConfig(decoder=_decoder_from_hf(hf), vision=_vision_from_hf(hf["vision_config"], "internvit"),
                           projector=ProjectorConfig(downsample_ratio=hf.get("downsample_ratio", 0.5), bias=bias),
                           image_token_id=hf["image_token_id"])
    if fmt == "qwen2":
        vision = (_vision_from_hf(vision_checkpoint.config, "internvit") if vision_checkpoint else VisionConfig())
        # A text-only start: by default Qwen2.5's tokenizer + the Long-VITA tokens (docs/design.md, "Token layout"),
        # reference projector.
        token = {} if image_token_id is None else {"image_token_id": image_token_id}
        return ModelConfig(decoder=_decoder_from_hf(hf), vision=vision, projector=ProjectorConfig(bias=False), **token)
    raise ConversionError(f"cannot build a model from a {fmt!r} checkpoint alone; "
                          "pass a qwen2 --hf-dir with this one as --vision-hf-dir")


def hf_config_from_model(config: ModelConfig, fmt: str, dtype: torch.dtype) -> dict:
    dtype_name = str(dtype).removeprefix("torch.")
    if fmt == "internvl":
        if not config.projector.bias:
            raise ConversionError("transformers' InternVL projector has linear biases; this model has none "
                                  "(use --format longvita)")
        return {"model_type": "internvl", "architectures": ["InternVLForConditionalGeneration"],
                "text_config": _decoder_to_hf(config.decoder),
                "vision_config": {"model_type": "internvl_vision", **_vision_to_hf(config.vision, "internvl")},
                "downsample_ratio": config.downsample_ratio, "image_token_id": config.image_token_id,
                "image_seq_length": config.tokens_per_tile, "tie_word_embeddings": config.decoder.tie_embeddings,
                **INTERNVL_REQUIRED, "dtype": dtype_name}
    if fmt == "longvita":
        return {**_decoder_to_hf(config.decoder), "model_type": "long_vita",
                "vision_config": _vision_to_hf(config.vision, "internvit"),
                "downsample_ratio": config.downsample_ratio, "image_token_id": config.image_token_id,
                "dtype": dtype_name}
    if fmt == "qwen2":
        return {**_decoder_to_hf(config.decoder), "dtype": dtype_name}
    raise ConversionError(f"cannot write format {fmt!r}; use internvl, longvita or qwen2")


def detect_format(hf_config: dict) -> str:
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"config.json model_type {model_type!r} is not one of {', '.join(MODEL_TYPES)}; "
                              "pass --format")
    return MODEL_TYPES[model_type]


def hf_to_mcore(checkpoint: HFCheckpoint, fmt: str, config: ModelConfig,
                expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Megatron tensors from HF ones; every HF tensor must be used, every shape must match."""
    rows = mappings(fmt, config, list(expected), checkpoint.keys())
    converted, used = {}, set()
    for row in tqdm(rows, desc=f"hf2mcore {fmt}", unit="tensor", leave=False):
        shapes = [t.shape for t in row.transform.to_hf(expected[row.mcore].to("meta"))]
        tensors = []
        for name, shape in zip(row.hf, shapes):
            if name not in checkpoint:
                raise ConversionError(f"{checkpoint.directory}: missing tensor {name} (for {row.mcore})")
            found = checkpoint.shape(name)
            if found != tuple(shape):
                raise ConversionError(f"{checkpoint.directory}: tensor {name} has shape {list(found)}, "
                                      f"expected {list(shape)} (for {row.mcore})")
            tensors.append(checkpoint.get(name))
        converted[row.mcore] = row.transform.to_mcore(tensors)
        used.update(row.hf)
    extra = sorted(set(checkpoint.keys()) - used)
    if extra:
        raise ConversionError(f"{checkpoint.directory}: {len(extra)} tensor(s) the {fmt} format does not map, "
                              f"e.g. {', '.join(extra[:5])}")
    return converted


def mcore_to_hf(state: dict[str, torch.Tensor], fmt: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    tensors = {}
    for row in tqdm(mappings(fmt, config, list(state)), desc=f"mcore2hf {fmt}", unit="tensor", leave=False):
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
    return build_long_vita(config, ParallelConfig(), params_dtype=dtype, layer_spec="local",
                           vision_layer_spec="vision_local")


def hf2mcore(hf_dir: str, save_dir: str, fmt: Optional[str] = None, vision_hf_dir: Optional[str] = None,
             tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
             image_token_id: Optional[int] = None) -> ModelConfig:
    checkpoint = HFCheckpoint(hf_dir)
    fmt = fmt or detect_format(checkpoint.config)
    vision_checkpoint = HFCheckpoint(vision_hf_dir) if vision_hf_dir else None
    if fmt != "qwen2" and (vision_checkpoint or image_token_id is not None):
        raise ConversionError(f"--vision-hf-dir and --image-token-id go with a text-only qwen2 --hf-dir, not {fmt}")
    config = model_config_from_hf(checkpoint, fmt, vision_checkpoint, image_token_id)
    config.validate_parallel(tensor_model_parallel_size, pipeline_model_parallel_size)
    dtype = checkpoint.get(checkpoint.keys()[0]).dtype
    _single_process_setup()
    model = _build_unsharded(config, dtype)
    state = _model_state(model)
    sources = [(checkpoint, fmt)] + ([(vision_checkpoint, "internvit")] if vision_checkpoint else [])
    with torch.no_grad():
        for source, source_fmt in sources:
            for name, tensor in hf_to_mcore(source, source_fmt, config, state).items():
                state[name].copy_(tensor)
    save_model([model], save_dir)
    if dist.get_rank() == 0:
        save_model_config(save_dir, config, dtype)
    return config


def mcore2hf(load_dir: str, save_dir: str, fmt: str, max_shard_bytes: int = 5 * 2**30) -> None:
    config, dtype = load_model_config(load_dir)
    _single_process_setup()
    model = _build_unsharded(config, dtype)
    load_model([model], load_dir)
    tensors = mcore_to_hf(_model_state(model), fmt, config)
    if dist.get_rank() == 0:
        save_hf_checkpoint(save_dir, hf_config_from_model(config, fmt, dtype), tensors, max_shard_bytes)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_mcore = commands.add_parser("hf2mcore", help="HF safetensors -> megatron-core torch_dist")
    to_mcore.add_argument("--hf-dir", required=True)
    to_mcore.add_argument("--save-dir", required=True)
    to_mcore.add_argument("--format", choices=sorted(set(MODEL_TYPES.values())), default=None,
                          help="source format (default: from config.json model_type)")
    to_mcore.add_argument("--vision-hf-dir", default=None,
                          help="InternViT checkpoint for the vision tower of a text-only qwen2 --hf-dir")
    to_mcore.add_argument("--image-token-id", type=int, default=None,
                          help="<IMG_CONTEXT> id for a qwen2 --hf-dir (default: stock Qwen2.5 + Long-VITA tokens)")
    add_parallel_arguments(to_mcore, ("tensor_model_parallel_size", "pipeline_model_parallel_size"),
                           help={"tensor_model_parallel_size": "check the model builds at this layout "
                                                               "(torch_dist loads at any layout)"})
    to_hf = commands.add_parser("mcore2hf", help="megatron-core torch_dist -> HF safetensors")
    to_hf.add_argument("--load-dir", required=True)
    to_hf.add_argument("--save-dir", required=True)
    to_hf.add_argument("--format", choices=("internvl", "longvita", "qwen2"), required=True)
    to_hf.add_argument("--max-shard-size-gb", type=float, default=5.0)
    args = parser.parse_args(argv)
    setup_platform()
    try:
        if args.command == "hf2mcore":
            parallel = parallel_config_from_args(args)
            hf2mcore(args.hf_dir, args.save_dir, args.format, args.vision_hf_dir, parallel.tensor_model_parallel_size,
                     parallel.pipeline_model_parallel_size, args.image_token_id)
        else:
            mcore2hf(args.load_dir, args.save_dir, args.format, int(args.max_shard_size_gb * 2**30))
    except ConversionError as error:
        parser.exit(2, f"error: {error}\n")
    finally:
        from megatron_longvita.platform import destroy_distributed

        destroy_distributed()


if __name__ == "__main__":
    main()
