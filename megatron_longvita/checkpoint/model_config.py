"""The model-config sidecar every checkpoint carries: what to build before loading its tensors,
and the tokenizer whose token ids the model was built with (exported with the model)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Union

import torch

from megatron_longvita.checkpoint.tokenizer import HFTokenizer
from megatron_longvita.config.tokens import SPECIAL_TOKENS
from megatron_longvita.models.presets import ModelConfig

CONFIG_FILE = "longvita_config.json"
TOKENIZER_DIR = "tokenizer"


def save_model_config(
    directory: str, config: ModelConfig, dtype: torch.dtype, tokenizer: Optional[Union[HFTokenizer, str]] = None
) -> None:
    """The sidecar, and under `tokenizer/` the tokenizer files: a tokenizer, or the directory of a
    training tokenizer, to which the Long-VITA tokens are appended as the data pipeline does on load."""
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump({"model": dataclasses.asdict(config), "params_dtype": str(dtype).removeprefix("torch.")}, f, indent=2)
    if tokenizer is not None:
        if isinstance(tokenizer, str):
            tokenizer = HFTokenizer(tokenizer)
            tokenizer.append_special_tokens(SPECIAL_TOKENS, config.decoder.vocab_size)
        tokenizer.save(os.path.join(directory, TOKENIZER_DIR))


def has_model_config(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, CONFIG_FILE))


def load_model_config(directory: str) -> tuple[ModelConfig, torch.dtype]:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}: not a checkpoint written by hf2mcore or train")
    with open(path) as f:
        data = json.load(f)
    return ModelConfig.from_dict(data["model"]), getattr(torch, data["params_dtype"])
