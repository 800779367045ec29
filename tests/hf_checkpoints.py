"""Tiny Hugging Face checkpoints in the layouts users bring, and an independent reference model.

- `qwen_style_tokenizer`: a byte-level BPE whose special tokens follow the merged vocabulary, as
  the stock Qwen2.5 tokenizer's do (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``), plus any
  extra tokens after them; no Long-VITA tokens unless asked for.
- `Oracle`: transformers' own InternVL vision tower and Qwen2ForCausalLM with an ``nn.Sequential``
  projector of Long-VITA's geometry (LayerNorm(4 x vit) -> Linear(4 x vit -> vit) -> GELU ->
  Linear(vit -> llm), no biases); it shares no code with megatron_longvita.
- `save_released_longvita`: the oracle's weights written in the released Long-VITA layout
  (``model.vision_model.*`` InternViT names, ``model.vision_projection.*``, Qwen2 names, and a
  ``config.json`` with the released key set, the ViT config under ``visual``).
"""

from __future__ import annotations

import json
import os
import random
from typing import Optional

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

STOCK_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def qwen_style_tokenizer(directory: str, size: int, extra: tuple[str, ...] = ()) -> Tokenizer:
    """`size` tokens: BPE merges, then the stock specials, then `extra` (all added as special)."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    text = [
        " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(12)) for _ in range(400)
    ]
    base = size - len(STOCK_SPECIALS) - len(extra)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(text, trainers.BpeTrainer(vocab_size=base, show_progress=False))
    assert tokenizer.get_vocab_size() == base, f"BPE gave {tokenizer.get_vocab_size()} tokens, not {base}"
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*STOCK_SPECIALS, *extra)])
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "model_max_length": 4096}, f)
    return tokenizer


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Random weights (defaults hide mistakes: zero biases, constant layer scales); norms near 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            is_norm_weight = "norm" in name and name.endswith("weight")
            noise = torch.randn(param.shape, generator=generator) * 0.2
            param.copy_(noise + (1.0 if is_norm_weight else 0.0))


VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14
)
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
ROPE_THETA = 1e6


class Oracle(torch.nn.Module):
    """The Long-VITA forward from transformers' modules: ViT (class token dropped), pixel shuffle 0.5,
    projector, features scattered onto the prompt's placeholder positions, Qwen2."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        from transformers import InternVLVisionConfig, InternVLVisionModel, Qwen2Config, Qwen2ForCausalLM

        super().__init__()
        self.vision = InternVLVisionModel(InternVLVisionConfig(**VISION, attention_bias=True, layer_norm_eps=1e-6))
        vit, llm = VISION["hidden_size"], TEXT["hidden_size"]
        self.projector = torch.nn.Sequential(
            torch.nn.LayerNorm(4 * vit),
            torch.nn.Linear(4 * vit, vit, bias=False),
            torch.nn.GELU(),
            torch.nn.Linear(vit, llm, bias=False),
        )
        self.llm = Qwen2ForCausalLM(
            Qwen2Config(
                **TEXT, vocab_size=vocab_size, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}
            )
        )
        randomise(self, seed)
        self.eval()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        from transformers.models.internvl.modeling_internvl import InternVLModel

        features = self.vision(pixel_values=pixel_values).last_hidden_state[:, 1:]
        tiles, patches, channels = features.shape
        side = int(patches**0.5)
        shuffled = InternVLModel.pixel_shuffle(None, features.reshape(tiles, side, side, channels), 0.5)
        return self.projector(shuffled.reshape(tiles, -1, shuffled.shape[-1])).reshape(-1, TEXT["hidden_size"])

    @torch.no_grad()
    def greedy(
        self, prompt: list[int], pixel_values: Optional[torch.Tensor], placeholders: tuple[int, ...], steps: int
    ) -> tuple[torch.Tensor, list[int]]:
        """First generated position's logits and `steps` greedy tokens (the whole sequence re-run per step)."""
        features = None if pixel_values is None else self.image_features(pixel_values)
        tokens, generated, first = list(prompt), [], None
        for _ in range(steps):
            ids = torch.tensor([tokens])
            embeds = self.llm.get_input_embeddings()(ids)
            if features is not None:
                slots = torch.isin(ids, torch.tensor(placeholders))
                slots[:, len(prompt) :] = False  # generated tokens are text
                assert int(slots.sum()) == len(features), "placeholders and image tokens disagree"
                embeds[slots] = features
            logits = self.llm(inputs_embeds=embeds).logits[0, -1]
            first = logits if first is None else first
            generated.append(int(logits.argmax()))
            tokens.append(generated[-1])
        assert not set(generated) & set(placeholders), "a placeholder was generated: pick another seed"
        return first, generated


def _internvit_names(vision: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """transformers' InternVL vision names -> OpenGVLab InternViT names (as inside the release)."""
    out = {
        "embeddings.class_embedding": vision["embeddings.cls_token"],
        "embeddings.position_embedding": vision["embeddings.position_embeddings"],
    }
    for suffix in ("weight", "bias"):
        out[f"embeddings.patch_embedding.{suffix}"] = vision[f"embeddings.patch_embeddings.projection.{suffix}"]
    for i in range(layers):
        theirs, ours = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        out[ours + "ls1"], out[ours + "ls2"] = vision[theirs + "lambda_1"], vision[theirs + "lambda_2"]
        for suffix in ("weight", "bias"):
            out[ours + f"attn.qkv.{suffix}"] = torch.cat(
                [vision[theirs + f"attention.{p}_proj.{suffix}"] for p in "qkv"]
            )
            pairs = {
                "attn.proj": "attention.projection_layer",
                "norm1": "layernorm_before",
                "norm2": "layernorm_after",
                "mlp.fc1": "mlp.fc1",
                "mlp.fc2": "mlp.fc2",
            }
            for mine, transformers_name in pairs.items():
                out[ours + f"{mine}.{suffix}"] = vision[theirs + f"{transformers_name}.{suffix}"]
    return {name: tensor.contiguous() for name, tensor in out.items()}


def released_text_config(vocab_size: int) -> dict:
    """The released 14B config.json's top-level key set, at the tiny sizes."""
    return {
        "architectures": ["LongVITAForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": TEXT["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": TEXT["intermediate_size"],
        "max_position_embeddings": TEXT["max_position_embeddings"],
        "max_window_layers": TEXT["num_hidden_layers"],
        "model_type": "long_vita",
        "num_attention_heads": TEXT["num_attention_heads"],
        "num_hidden_layers": TEXT["num_hidden_layers"],
        "num_key_value_heads": TEXT["num_key_value_heads"],
        "rms_norm_eps": TEXT["rms_norm_eps"],
        "rope_theta": ROPE_THETA,
        "sliding_window": TEXT["max_position_embeddings"],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.43.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def released_visual_config() -> dict:
    """The released `visual` key set (InternViT-300M's settings), at the tiny sizes."""
    return {
        "architectures": ["InternVisionModel"],
        "auto_map": {
            "AutoConfig": "configuration_intern_vit.InternVisionConfig",
            "AutoModel": "modeling_intern_vit.InternVisionModel",
        },
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": VISION["hidden_size"],
        "image_size": VISION["image_size"],
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": VISION["intermediate_size"],
        "layer_norm_eps": 1e-6,
        "model_type": "intern_vit_6b",
        "norm_type": "layer_norm",
        "num_attention_heads": VISION["num_attention_heads"],
        "num_channels": 3,
        "num_hidden_layers": VISION["num_hidden_layers"],
        "patch_size": VISION["patch_size"],
        "qk_normalization": False,
        "qkv_bias": True,
        "torch_dtype": "float32",
        "transformers_version": "4.37.2",
        "use_flash_attn": True,
    }


def released_tensors(oracle: Oracle) -> dict[str, torch.Tensor]:
    vision = _internvit_names(oracle.vision.state_dict(), VISION["num_hidden_layers"])
    norm, fc1, _, fc2 = oracle.projector
    tensors = {f"model.vision_model.{name}": tensor for name, tensor in vision.items()}
    tensors.update(
        {
            "model.vision_projection.pre_proj_layernorm.weight": norm.weight.detach(),
            "model.vision_projection.pre_proj_layernorm.bias": norm.bias.detach(),
            "model.vision_projection.mlp.0.weight": fc1.weight.detach(),
            "model.vision_projection.mlp.2.weight": fc2.weight.detach(),
        }
    )
    tensors.update({name: tensor for name, tensor in oracle.llm.state_dict().items()})
    return {name: tensor.detach().clone().contiguous() for name, tensor in tensors.items()}


def save_released_longvita(directory: str, oracle: Oracle, tokenizer_size: int) -> dict:
    """The release's files: config.json (+ `visual`), safetensors, a stock-Qwen-style tokenizer
    WITHOUT the Long-VITA tokens; the vocabulary padded beyond the tokenizer, as released."""
    vocab_size = oracle.llm.config.vocab_size
    assert vocab_size >= tokenizer_size + 17
    tokenizer = qwen_style_tokenizer(directory, tokenizer_size)
    config = released_text_config(vocab_size) | {"visual": released_visual_config()}
    config["bos_token_id"] = tokenizer.token_to_id("<|endoftext|>")
    config["eos_token_id"] = tokenizer.token_to_id("<|im_end|>")
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(released_tensors(oracle), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return config


def save_split_qwen2_internvit(released_dir: str, qwen2_dir: str, internvit_dir: str) -> None:
    """A stage-1 start from the released files: the Qwen2 LLM alone (+ tokenizer) and the InternViT alone."""
    from safetensors.torch import load_file

    with open(os.path.join(released_dir, "config.json")) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(released_dir, "model.safetensors"))
    vision_prefix = "model.vision_model."
    text_config = {k: v for k, v in config.items() if k != "visual"} | {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
    }
    parts = {
        qwen2_dir: (
            text_config,
            {k: v for k, v in tensors.items() if not k.startswith((vision_prefix, "model.vision_projection."))},
        ),
        internvit_dir: (
            config["visual"],
            {k.removeprefix(vision_prefix): v for k, v in tensors.items() if k.startswith(vision_prefix)},
        ),
    }
    for directory, (part_config, part_tensors) in parts.items():
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(part_config, f, indent=2)
        save_file(part_tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(released_dir, name)) as src, open(os.path.join(qwen2_dir, name), "w") as dst:
            dst.write(src.read())


# A transformers InternVL checkpoint with a vocabulary under 256 and <IMG_CONTEXT> near its end.
INTERNVL_VOCAB = 251
INTERNVL_EXTRA = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>")


def save_small_vocab_internvl(directory: str) -> int:
    """Returns the image token id (247 of 251)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    tokenizer = qwen_style_tokenizer(directory, INTERNVL_VOCAB, INTERNVL_EXTRA)
    image_token = tokenizer.token_to_id("<IMG_CONTEXT>")
    config = InternVLConfig(
        vision_config=dict(**VISION, attention_bias=True),
        text_config=dict(
            model_type="qwen2",
            **TEXT,
            vocab_size=INTERNVL_VOCAB,
            rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        ),
        image_token_id=image_token,
        image_seq_length=4,
        tie_word_embeddings=False,
    )
    model = InternVLForConditionalGeneration(config)
    randomise(model, 3)
    model.save_pretrained(directory)
    return image_token
