"""Parallel layout, named after Megatron-LM's flags, and the one definition of those flags."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Optional


class ConfigError(ValueError):
    """A setting that cannot work; the message says which flag and how to fix it."""


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        self.validate(world_size)
        return world_size // self.model_parallel_size

    def validate(self, world_size: int) -> None:
        for flag, value in (
            ("--tensor-model-parallel-size", self.tensor_model_parallel_size),
            ("--pipeline-model-parallel-size", self.pipeline_model_parallel_size),
            ("--context-parallel-size", self.context_parallel_size),
        ):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if world_size % self.model_parallel_size:
            raise ConfigError(
                f"world size {world_size} is not divisible by TP x PP x CP = "
                f"{self.tensor_model_parallel_size} x {self.pipeline_model_parallel_size} x "
                f"{self.context_parallel_size}; launch a multiple of {self.model_parallel_size} ranks"
            )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 2 or self.pipeline_model_parallel_size < 2):
            raise ConfigError(
                f"--virtual-pipeline-model-parallel-size {vpp}: interleaving needs >= 2 virtual stages and "
                "--pipeline-model-parallel-size >= 2"
            )


# ParallelConfig field -> (Megatron-LM flag, short alias). Every CLI takes its parallel flags from here.
PARALLEL_FLAGS: dict[str, tuple[str, str]] = {
    "tensor_model_parallel_size": ("--tensor-model-parallel-size", "--tp"),
    "pipeline_model_parallel_size": ("--pipeline-model-parallel-size", "--pp"),
    "context_parallel_size": ("--context-parallel-size", "--cp"),
    "virtual_pipeline_model_parallel_size": ("--virtual-pipeline-model-parallel-size", "--vpp"),
    "sequence_parallel": ("--sequence-parallel", "--sp"),
}


def add_parallel_arguments(
    parser: argparse.ArgumentParser, names: Optional[Sequence[str]] = None, help: Optional[dict[str, str]] = None
) -> None:
    """Add the flags of the ParallelConfig fields ``names`` (default: all) to ``parser``.

    Each flag stores into the field's name and defaults to None (not given), so
    :func:`parallel_config_from_args` can lay the given ones over any base layout.
    """
    for name in names or PARALLEL_FLAGS:
        flag, alias = PARALLEL_FLAGS[name]
        text = (help or {}).get(name)
        if name == "sequence_parallel":
            parser.add_argument(flag, alias, dest=name, action="store_true", default=None, help=text)
        else:
            parser.add_argument(flag, alias, dest=name, type=int, default=None, help=text)


def parallel_config_from_args(args: argparse.Namespace, base: ParallelConfig = ParallelConfig()) -> ParallelConfig:
    """``base`` with every parallel flag given on the command line applied."""
    given = {
        field.name: getattr(args, field.name)
        for field in fields(ParallelConfig)
        if getattr(args, field.name, None) is not None
    }
    return replace(base, **given)
