"""The model-config sidecar every checkpoint carries: what to build before loading its tensors."""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from megatron_longvita.models.presets import ModelConfig

CONFIG_FILE = "longvita_config.json"


def save_model_config(directory: str, config: ModelConfig, dtype: torch.dtype) -> None:
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump({"model": dataclasses.asdict(config), "params_dtype": str(dtype).removeprefix("torch.")}, f,
                  indent=2)


def load_model_config(directory: str) -> tuple[ModelConfig, torch.dtype]:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}: not a checkpoint written by hf2mcore or train")
    with open(path) as f:
        data = json.load(f)
    return ModelConfig.from_dict(data["model"]), getattr(torch, data["params_dtype"])
