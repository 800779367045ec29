"""One registered object per Hugging Face checkpoint format: its tensor layouts and its config
reader and writer, chosen from the checkpoint's own ``config.json`` (``model_type``).

- ``longvita``: the released Long-VITA layout exactly (a Qwen2 config with ``model_type:
  long_vita`` and the InternViT config under ``visual``; the authors' bias-free projector).
- ``internvl``: transformers' InternVLForConditionalGeneration (its on-disk and module names).
- ``qwen2``: a text-only Qwen2 checkpoint; with an ``internvit`` checkpoint as the vision tower
  it starts a Long-VITA model (fresh projector).
- ``internvit``: a standalone InternViT checkpoint, read only as the vision tower of a qwen2 start.

Written configs carry every key transformers 4.4x (``rope_theta``, ``torch_dtype``), 5.x
(``rope_parameters``, ``dtype``) and the authors' config classes read, so none of them falls
back to a default. Facts: docs/design.md, "Checkpoint names".
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from megatron_longvita.checkpoint.hf import HFCheckpoint
from megatron_longvita.checkpoint.mapping import (
    HEAD_ROWS,
    LANGUAGE_ROWS,
    PROJECTOR_ROWS,
    VISION_ROWS,
    Part,
    multimodal_parts,
)
from megatron_longvita.checkpoint.tokenizer import HFTokenizer
from megatron_longvita.config.tokens import CHATML_TOKENS, CONTEXT_TOKENS, PAD_TOKEN, SPECIAL_TOKENS
from megatron_longvita.models.decoder import DecoderConfig
from megatron_longvita.models.presets import CONTEXT_TOKEN_FIELDS, ModelConfig
from megatron_longvita.models.projector import ProjectorConfig
from megatron_longvita.models.vision import VisionConfig
from megatron_longvita.registry import Registry


class ConversionError(ValueError):
    """A checkpoint that does not fit the model or the format: names the tensor, key or token."""


def _dtype_keys(dtype: torch.dtype) -> dict[str, str]:
    name = str(dtype).removeprefix("torch.")
    return {"torch_dtype": name, "dtype": name}  # transformers 4.x, 5.x


def _require(section: str, hf: dict, required: dict[str, Any]) -> None:
    for key, value in required.items():
        if key in hf and hf[key] != value:
            raise ConversionError(f"{section}.{key} = {hf[key]!r} is not supported (only {value!r})")


def _present(section: str, hf: dict, keys: list[str]) -> None:
    missing = [key for key in keys if key not in hf]
    if missing:
        raise ConversionError(f"{section} lacks {', '.join(missing)}")


def _side(value: Any) -> int:
    return value[0] if isinstance(value, (list, tuple)) else value


# ---- Qwen2 text config (top level of qwen2 / longvita, text_config of internvl) ----

QWEN2_KEYS = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
    "norm_epsilon": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
}
QWEN2_REQUIRED = {"hidden_act": "silu", "use_sliding_window": False}


def qwen2_text_from_hf(section: str, text: dict) -> DecoderConfig:
    _require(section, text, QWEN2_REQUIRED)
    _present(
        section,
        text,
        [key for key in QWEN2_KEYS.values() if key not in ("tie_word_embeddings", "max_position_embeddings")],
    )
    rope = text.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or text.get("rope_scaling"):
        raise ConversionError(
            f"{section}: RoPE scaling {rope or text['rope_scaling']} is not a trained setting this "
            "converter keeps; convert the unscaled model (scaling is an inference option)"
        )
    theta = rope.get("rope_theta", text.get("rope_theta"))
    fields = {ours: text[theirs] for ours, theirs in QWEN2_KEYS.items() if theirs in text}
    return DecoderConfig(**fields, **({"rotary_base": float(theta)} if theta is not None else {}))


def qwen2_text_to_hf(decoder: DecoderConfig, tokenizer: HFTokenizer) -> dict:
    """Every key Qwen2Config reads in transformers 4.4x and 5.x (RoPE under both names)."""
    special_ids = {"bos_token_id": tokenizer.token_id(PAD_TOKEN), "eos_token_id": tokenizer.token_id(CHATML_TOKENS[1])}
    return {
        **{theirs: getattr(decoder, ours) for ours, theirs in QWEN2_KEYS.items()},
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "rope_theta": decoder.rotary_base,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": decoder.rotary_base},
        "use_sliding_window": False,
        "sliding_window": decoder.max_position_embeddings,
        "max_window_layers": decoder.num_layers,
        **{key: token_id for key, token_id in special_ids.items() if token_id is not None},
    }


# ---- InternViT config (Long-VITA's `visual`, a standalone InternViT config.json) ----

INTERNVIT_KEYS = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "image_size": "image_size",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "norm_epsilon": "layer_norm_eps",
    "qkv_bias": "qkv_bias",
    "layer_scale_init": "initializer_factor",
}
# Settings this model implements; the authors' class defaults differ (qkv_bias False, rms_norm, qk norm on),
# so the keys it reads must be present rather than assumed.
INTERNVIT_REQUIRED = {"norm_type": "layer_norm", "qk_normalization": False, "hidden_act": "gelu"}
INTERNVIT_PRESENT = [
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "qkv_bias",
    "layer_norm_eps",
    "norm_type",
    "qk_normalization",
]


def internvit_from_hf(section: str, vision: dict) -> VisionConfig:
    _require(section, vision, INTERNVIT_REQUIRED)
    _present(section, vision, INTERNVIT_PRESENT)
    fields = {ours: vision[theirs] for ours, theirs in INTERNVIT_KEYS.items() if theirs in vision}
    return VisionConfig(**fields)


def internvit_to_hf(vision: VisionConfig, dtype: torch.dtype) -> dict:
    """Every argument of the authors' InternVisionConfig."""
    return {
        "model_type": "intern_vit_6b",
        "architectures": ["InternVisionModel"],
        **{theirs: getattr(vision, ours) for ours, theirs in INTERNVIT_KEYS.items()},
        **INTERNVIT_REQUIRED,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "initializer_range": 0.02,
        "use_flash_attn": True,
        **_dtype_keys(dtype),
    }


# ---- the formats ----


class CheckpointFormat:
    """A Hugging Face layout: tensor parts per on-disk layout (the first is written) and the config."""

    name: str
    model_types: tuple[str, ...]  # config.json model_type values this format reads
    layouts: list[list[Part]]
    standalone = True  # False: only read as part of another format's start

    def read_config(
        self, checkpoint: HFCheckpoint, tokenizer: HFTokenizer, vision: Optional[HFCheckpoint] = None
    ) -> ModelConfig:
        raise NotImplementedError

    def write_config(self, config: ModelConfig, dtype: torch.dtype, tokenizer: HFTokenizer) -> dict:
        raise ConversionError(f"cannot write the {self.name} format")


CHECKPOINT_FORMATS: Registry[CheckpointFormat] = Registry("checkpoint format")


def register_format(cls: type[CheckpointFormat]) -> type[CheckpointFormat]:
    """Class decorator: registers one instance under the class's `name` (plugins use it too)."""
    CHECKPOINT_FORMATS.register(cls.name)(cls())
    return cls


def format_of(hf_config: dict, directory: str) -> CheckpointFormat:
    """The registered format whose model_type the checkpoint's config.json names."""
    model_type = hf_config.get("model_type")
    for name in CHECKPOINT_FORMATS.names():
        if model_type in CHECKPOINT_FORMATS.get(name).model_types:
            return CHECKPOINT_FORMATS.get(name)
    known = sorted(t for n in CHECKPOINT_FORMATS.names() for t in CHECKPOINT_FORMATS.get(n).model_types)
    raise ConversionError(f"{directory}/config.json: model_type {model_type!r} is none of {', '.join(known)}")


def longvita_tokens(tokenizer: HFTokenizer, vocab_size: int) -> dict[str, int]:
    """Placeholder id fields, the 17 Long-VITA tokens appended in order where the tokenizer lacks them."""
    ids = tokenizer.append_special_tokens(SPECIAL_TOKENS, vocab_size)
    return {CONTEXT_TOKEN_FIELDS[token]: ids[token] for token in CONTEXT_TOKENS}


def _check_tokens(config: ModelConfig, tokenizer: HFTokenizer) -> None:
    for token, token_id in config.context_tokens.items():
        if tokenizer.token_id(token) != token_id:
            raise ConversionError(
                f"tokenizer {tokenizer.directory}: {token} has id {tokenizer.token_id(token)}, the "
                f"model uses {token_id}; pass the tokenizer the model was trained with"
            )


@register_format
class LongVitaFormat(CheckpointFormat):
    name, model_types = "longvita", ("long_vita",)
    layouts = [
        multimodal_parts(
            VISION_ROWS["internvit"],
            PROJECTOR_ROWS["longvita"],
            ("model.vision_model.", "model.vision_projection.", "model.", ""),
        )
    ]
    # the authors' ResamplerProjector fixes these
    downsample_ratio = 0.5

    def read_config(self, checkpoint, tokenizer, vision=None):
        hf = checkpoint.config
        if "visual" not in hf:
            raise ConversionError(
                f"{checkpoint.directory}/config.json: a long_vita config keeps the InternViT "
                "config under 'visual'; it has none"
            )
        decoder = qwen2_text_from_hf("config", hf)
        vision_config = internvit_from_hf("config.visual", hf["visual"])
        projector = ProjectorConfig(
            downsample_ratio=self.downsample_ratio, bias=False, ffn_hidden_size=vision_config.hidden_size
        )
        return ModelConfig(
            decoder=decoder, vision=vision_config, projector=projector, **longvita_tokens(tokenizer, decoder.vocab_size)
        )

    def write_config(self, config, dtype, tokenizer):
        projector = config.projector
        geometry = (projector.bias, projector.intermediate_size(config.decoder.hidden_size), projector.downsample_ratio)
        if geometry != (False, config.vision.hidden_size, self.downsample_ratio):
            raise ConversionError(
                f"Long-VITA's projector is bias-free, {config.vision.hidden_size} wide (the ViT "
                f"width), pixel shuffle 0.5; this model has bias={geometry[0]}, width {geometry[1]}, "
                f"ratio {geometry[2]} (use --format internvl if it fits that)"
            )
        _check_tokens(config, tokenizer)
        return {
            "model_type": "long_vita",
            "architectures": ["LongVITAForCausalLM"],
            **qwen2_text_to_hf(config.decoder, tokenizer),
            "visual": internvit_to_hf(config.vision, dtype),
            **_dtype_keys(dtype),
        }


# transformers' InternVL vision config: InternViT's keys, two of them renamed.
INTERNVL_VISION_KEYS = {**INTERNVIT_KEYS, "qkv_bias": "attention_bias", "layer_scale_init": "layer_scale_init_value"}
INTERNVL_VISION_REQUIRED = {
    "norm_type": "layer_norm",
    "use_qk_norm": False,
    "hidden_act": "gelu",
    "use_mean_pooling": True,
    "use_absolute_position_embeddings": True,
}
INTERNVL_REQUIRED = {
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
}


@register_format
class InternVLFormat(CheckpointFormat):
    """transformers writes the hub names (vision_tower., language_model.model., ...); its modules are
    named model.vision_tower., model.language_model., ...: both are read, the first written."""

    name, model_types = "internvl", ("internvl",)
    layouts = [
        multimodal_parts(
            VISION_ROWS["internvl"],
            PROJECTOR_ROWS["internvl"],
            ("vision_tower.", "multi_modal_projector.", "language_model.model.", "language_model."),
        ),
        multimodal_parts(
            VISION_ROWS["internvl"],
            PROJECTOR_ROWS["internvl"],
            ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", ""),
        ),
    ]

    def read_config(self, checkpoint, tokenizer, vision=None):
        hf = checkpoint.config
        _require("config", hf, INTERNVL_REQUIRED)
        text = {**hf["text_config"], "tie_word_embeddings": hf.get("tie_word_embeddings", False)}
        decoder = qwen2_text_from_hf("config.text_config", text)
        vision_hf = hf["vision_config"]
        _require("config.vision_config", vision_hf, INTERNVL_VISION_REQUIRED)
        fields = {ours: vision_hf[theirs] for ours, theirs in INTERNVL_VISION_KEYS.items() if theirs in vision_hf}
        for key in ("image_size", "patch_size"):
            if key in fields:
                fields[key] = _side(fields[key])
        # InternVL puts every tile and frame on <IMG_CONTEXT>: patch / video placeholders only if it defines them
        image_id = tokenizer.require("<IMG_CONTEXT>", decoder.vocab_size)
        if "image_token_id" in hf and hf["image_token_id"] != image_id:
            raise ConversionError(
                f"{checkpoint.directory}: config image_token_id {hf['image_token_id']} is not the "
                f"tokenizer's <IMG_CONTEXT> ({image_id})"
            )
        optional = {}
        for token in ("<PATCH_CONTEXT>", "<VID_CONTEXT>"):
            token_id = tokenizer.token_id(token)
            optional[CONTEXT_TOKEN_FIELDS[token]] = (
                None if token_id is None else tokenizer.require(token, decoder.vocab_size)
            )
        return ModelConfig(
            decoder=decoder,
            vision=VisionConfig(**fields),
            projector=ProjectorConfig(
                downsample_ratio=hf.get("downsample_ratio", 0.5), bias=True, ffn_hidden_size=decoder.hidden_size
            ),
            image_token_id=image_id,
            **optional,
        )

    def write_config(self, config, dtype, tokenizer):
        projector = config.projector
        if not projector.bias or projector.intermediate_size(config.decoder.hidden_size) != config.decoder.hidden_size:
            raise ConversionError(
                "transformers' InternVL projector is LLM-hidden wide with biases; this model's is "
                f"{projector.intermediate_size(config.decoder.hidden_size)} wide, bias="
                f"{projector.bias} (use --format longvita)"
            )
        _check_tokens(config, tokenizer)
        vision = {theirs: getattr(config.vision, ours) for ours, theirs in INTERNVL_VISION_KEYS.items()}
        return {
            "model_type": "internvl",
            "architectures": ["InternVLForConditionalGeneration"],
            "text_config": {"model_type": "qwen2", **qwen2_text_to_hf(config.decoder, tokenizer), **_dtype_keys(dtype)},
            "vision_config": {"model_type": "internvl_vision", **vision, **INTERNVL_VISION_REQUIRED},
            "downsample_ratio": projector.downsample_ratio,
            "image_token_id": config.image_token_id,
            "image_seq_length": config.tokens_per_tile,
            "tie_word_embeddings": config.decoder.tie_embeddings,
            **INTERNVL_REQUIRED,
            **_dtype_keys(dtype),
        }


@register_format
class Qwen2Format(CheckpointFormat):
    """A text-only LLM; with an InternViT checkpoint a Long-VITA start (Long-VITA's projector, fresh)."""

    name, model_types = "qwen2", ("qwen2",)
    layouts = [[Part("language_model.", LANGUAGE_ROWS, "model."), Part("language_model.", HEAD_ROWS, "")]]

    def read_config(self, checkpoint, tokenizer, vision=None):
        decoder = qwen2_text_from_hf("config", checkpoint.config)
        vision_config = VisionConfig()  # without an InternViT checkpoint: InternViT-300M, freshly initialised
        if vision is not None:
            vision_config = internvit_from_hf(f"{vision.directory}/config.json", vision.config)
        projector = ProjectorConfig(bias=False, ffn_hidden_size=vision_config.hidden_size)
        return ModelConfig(
            decoder=decoder, vision=vision_config, projector=projector, **longvita_tokens(tokenizer, decoder.vocab_size)
        )

    def write_config(self, config, dtype, tokenizer):
        return {
            "model_type": "qwen2",
            "architectures": ["Qwen2ForCausalLM"],
            **qwen2_text_to_hf(config.decoder, tokenizer),
            **_dtype_keys(dtype),
        }


@register_format
class InternViTFormat(CheckpointFormat):
    name, model_types = "internvit", ("intern_vit_6b",)
    layouts = [[Part("vision.", VISION_ROWS["internvit"], "")]]
    standalone = False

    def read_config(self, checkpoint, tokenizer, vision=None):
        raise ConversionError(
            f"{checkpoint.directory} is a vision tower alone: pass a qwen2 --hf-dir with it as --vision-hf-dir"
        )
