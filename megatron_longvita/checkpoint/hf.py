"""Hugging Face checkpoint directories: config.json + safetensors (single file or sharded index)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class HFCheckpoint:
    """Lazy reader: tensors are read from their shard only when asked for."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        config_path = os.path.join(directory, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{directory} is not a Hugging Face checkpoint directory (no config.json)")
        with open(config_path) as f:
            self.config: dict = json.load(f)
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                self._file_of: dict[str, str] = json.load(f)["weight_map"]
        else:
            files = sorted(name for name in os.listdir(directory) if name.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"{directory} has no *.safetensors files and no {INDEX_FILE}")
            self._file_of = {}
            for name in files:
                with safe_open(os.path.join(directory, name), framework="pt") as f:
                    self._file_of.update(dict.fromkeys(f.keys(), name))

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(os.path.join(self.directory, self._file_of[name]), framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        with safe_open(os.path.join(self.directory, self._file_of[name]), framework="pt") as f:
            return f.get_tensor(name)


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor
        size += nbytes
    if shard:
        yield shard


def save_hf_checkpoint(
    directory: str, config: dict, tensors: dict[str, torch.Tensor], max_shard_bytes: int = 5 * 2**30
) -> None:
    """config.json plus one safetensors file, or numbered shards and an index above `max_shard_bytes`."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shards = list(_shards(tensors, max_shard_bytes))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
