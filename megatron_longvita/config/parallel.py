"""Parallel layout, named after Megatron-LM's flags."""

from __future__ import annotations

from dataclasses import dataclass


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
        for flag, value in (("--tensor-model-parallel-size", self.tensor_model_parallel_size),
                            ("--pipeline-model-parallel-size", self.pipeline_model_parallel_size),
                            ("--context-parallel-size", self.context_parallel_size)):
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
                "--num-layers-per-virtual-pipeline-stage gives a virtual pipeline size "
                f"of {vpp}; interleaving needs >= 2 virtual stages and --pipeline-model-parallel-size >= 2"
            )
