"""TrainConfig: one YAML per stage recipe, overridable with Megatron-LM flag names.

The YAML nests sections (model, parallel, data, optimizer, schedule, checkpoint, logging);
``MEGATRON_FLAGS`` maps every flag users know from Megatron-LM onto one field, and is the
only place flag names appear. Validation runs before any process-group work and names the
flag to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import yaml

from megatron_longvita.config.parallel import ConfigError, ParallelConfig


@dataclass(frozen=True)
class ModelSection:
    preset: Optional[str] = None  # None: the model config of the checkpoint in --load / --save
    provider: str = "long_vita"
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_language_model: bool = False
    recompute_num_layers: int = 0
    vision_recompute_num_layers: int = 0
    lm_head: str = "full"  # full | chunked | masked
    lm_head_chunk_size: int = 4096


@dataclass(frozen=True)
class DataSection:
    mixture: Optional[str] = None
    tokenizer: Optional[str] = None
    seq_length: int = 4096
    packing: str = "reset"  # reset (stages 1-2) | no_reset (stages 3-4)
    micro_batch_size: int = 1
    global_batch_size: int = 1
    num_workers: int = 2
    max_num_frames: int = 128
    max_tiles: int = 12
    media_root: Optional[str] = None
    strict: bool = False


@dataclass(frozen=True)
class OptimizerSection:
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True
    vision_lr_mult: float = 1.0  # stage 2: 0.1
    vision_layer_decay: float = 1.0  # stage 2: 0.9 (layer-wise, deeper layers closer to vision_lr_mult)


@dataclass(frozen=True)
class ScheduleSection:
    train_iters: int = 10
    lr_warmup_fraction: float = 0.03
    lr_decay_style: str = "cosine"
    exit_interval: Optional[int] = None  # stop (after saving) at a multiple of this; the schedule is unchanged


@dataclass(frozen=True)
class CheckpointSection:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: int = 0
    finetune: bool = False  # load weights only: fresh optimizer, scheduler and data (stage N -> N+1)
    allow_unused_tensors: bool = False  # --load a checkpoint with tensors the model lacks: log each, not fail


@dataclass(frozen=True)
class LoggingSection:
    log_interval: int = 1
    tensorboard_dir: Optional[str] = None


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    bf16: bool = False
    seed: int = 1234

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def validate(self, world_size: int) -> None:
        """Everything checkable without a process group; each error names the flag to change."""
        from megatron_longvita.models.presets import get_preset

        self.parallel.validate(world_size)
        if self.model.preset is not None:
            get_preset(self.model.preset).validate_parallel(self.parallel.tensor_model_parallel_size,
                                                            self.parallel.pipeline_model_parallel_size)
        cp = self.parallel.context_parallel_size
        if cp > 1 and self.data.seq_length % (2 * cp):
            raise ConfigError(f"--seq-length {self.data.seq_length} is not divisible by 2 x --context-parallel-size "
                              f"= {2 * cp} (zigzag chunks); use a multiple of {2 * cp}")
        if self.data.packing == "reset" and self.data.micro_batch_size != 1:
            raise ConfigError("reset packing keeps one packed row per micro-batch (document boundaries are per "
                              "row): use --micro-batch-size 1")
        dp = self.parallel.data_parallel_size(world_size)
        per_step = self.data.micro_batch_size * dp
        if self.data.global_batch_size % per_step:
            raise ConfigError(f"--global-batch-size {self.data.global_batch_size} is not divisible by "
                              f"--micro-batch-size x data-parallel size = {self.data.micro_batch_size} x {dp}; "
                              f"use a multiple of {per_step}")
        if self.data.packing not in ("reset", "no_reset"):
            raise ConfigError(f"data.packing {self.data.packing!r}: use 'reset' (stages 1-2) or 'no_reset' (3-4)")
        if self.model.lm_head not in ("full", "chunked", "masked"):
            raise ConfigError(f"--lm-head {self.model.lm_head!r}: use full, chunked or masked")
        if self.schedule.train_iters < 1:
            raise ConfigError(f"--train-iters must be >= 1, got {self.schedule.train_iters}")

    def num_microbatches(self, world_size: int) -> int:
        dp = self.parallel.data_parallel_size(world_size)
        return self.data.global_batch_size // (self.data.micro_batch_size * dp)


def _flag(section: str, name: str, kind: type = int, action: Optional[str] = None) -> tuple[str, str, type, Optional[str]]:
    return section, name, kind, action


# Megatron-LM flag -> (section, field, type, argparse action). The one table of flag names.
MEGATRON_FLAGS: dict[str, tuple[str, str, type, Optional[str]]] = {
    "--tensor-model-parallel-size": _flag("parallel", "tensor_model_parallel_size"),
    "--pipeline-model-parallel-size": _flag("parallel", "pipeline_model_parallel_size"),
    "--context-parallel-size": _flag("parallel", "context_parallel_size"),
    "--virtual-pipeline-model-parallel-size": _flag("parallel", "virtual_pipeline_model_parallel_size"),
    "--sequence-parallel": _flag("parallel", "sequence_parallel", bool, "store_true"),
    "--seq-length": _flag("data", "seq_length"),
    "--micro-batch-size": _flag("data", "micro_batch_size"),
    "--global-batch-size": _flag("data", "global_batch_size"),
    "--num-workers": _flag("data", "num_workers"),
    "--data-path": _flag("data", "mixture", str),
    "--tokenizer-model": _flag("data", "tokenizer", str),
    "--max-num-frames": _flag("data", "max_num_frames"),
    "--lr": _flag("optimizer", "lr", float),
    "--min-lr": _flag("optimizer", "min_lr", float),
    "--weight-decay": _flag("optimizer", "weight_decay", float),
    "--adam-beta1": _flag("optimizer", "adam_beta1", float),
    "--adam-beta2": _flag("optimizer", "adam_beta2", float),
    "--clip-grad": _flag("optimizer", "clip_grad", float),
    "--use-distributed-optimizer": _flag("optimizer", "use_distributed_optimizer", bool, "store_true"),
    "--train-iters": _flag("schedule", "train_iters"),
    "--lr-warmup-fraction": _flag("schedule", "lr_warmup_fraction", float),
    "--lr-decay-style": _flag("schedule", "lr_decay_style", str),
    "--exit-interval": _flag("schedule", "exit_interval"),
    "--save": _flag("checkpoint", "save", str),
    "--load": _flag("checkpoint", "load", str),
    "--save-interval": _flag("checkpoint", "save_interval"),
    "--finetune": _flag("checkpoint", "finetune", bool, "store_true"),
    "--allow-unused-tensors": _flag("checkpoint", "allow_unused_tensors", bool, "store_true"),
    "--recompute-num-layers": _flag("model", "recompute_num_layers"),
    "--vision-recompute-num-layers": _flag("model", "vision_recompute_num_layers"),
    "--lm-head": _flag("model", "lm_head", str),
    "--logits-mask": _flag("model", "lm_head", str, "logits_mask"),
    "--lm-head-chunk-size": _flag("model", "lm_head_chunk_size"),
    "--log-interval": _flag("logging", "log_interval"),
    "--tensorboard-dir": _flag("logging", "tensorboard_dir", str),
    "--bf16": _flag("", "bf16", bool, "store_true"),
    "--seed": _flag("", "seed"),
}

_SECTIONS = {"model": ModelSection, "parallel": ParallelConfig, "data": DataSection, "optimizer": OptimizerSection,
             "schedule": ScheduleSection, "checkpoint": CheckpointSection, "logging": LoggingSection}


def _section_from_dict(kind: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    return kind(**values)


def config_from_dict(raw: dict[str, Any], where: str = "config") -> TrainConfig:
    unknown = sorted(set(raw) - set(_SECTIONS) - {"bf16", "seed"})
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; known: {sorted(_SECTIONS) + ['bf16', 'seed']}")
    sections = {name: _section_from_dict(kind, raw.get(name) or {}, f"{where}: {name}")
                for name, kind in _SECTIONS.items()}
    return TrainConfig(**sections, bf16=raw.get("bf16", False), seed=raw.get("seed", 1234))


def load_yaml(path: str) -> TrainConfig:
    """Relative data paths in the YAML resolve against the YAML's folder (flags: the CWD)."""
    with open(path) as handle:
        raw = yaml.safe_load(handle) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    data = dict(raw.get("data") or {})
    for key in ("mixture", "tokenizer", "media_root"):
        if data.get(key) and not os.path.isabs(data[key]):
            data[key] = os.path.join(os.path.dirname(os.path.abspath(path)), data[key])
    return config_from_dict({**raw, "data": data}, where=path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Long-VITA training on megatron-core")
    parser.add_argument("--config", required=True, help="stage YAML (examples/configs/)")
    for flag, (section, name, kind, action) in MEGATRON_FLAGS.items():
        destination = flag.lstrip("-").replace("-", "_")
        if action == "store_true":
            parser.add_argument(flag, dest=destination, action="store_true", default=None)
        elif action == "logits_mask":  # Megatron-LM style switch for the masked head
            parser.add_argument(flag, dest=destination, action="store_const", const="masked", default=None)
        else:
            parser.add_argument(flag, dest=destination, type=kind, default=None)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """The YAML named by --config, with every given Megatron flag applied on top."""
    args = build_parser().parse_args(argv)
    config = load_yaml(args.config)
    for flag, (section, name, _, _) in MEGATRON_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        if section:
            config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **{name: value})})
        else:
            config = dataclasses.replace(config, **{name: value})
    return config
