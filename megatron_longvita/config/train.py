"""TrainConfig: one YAML per stage recipe, overridable with Megatron-LM flag names.

The YAML nests sections (model, parallel, data, optimizer, schedule, checkpoint, logging);
each section is the dataclass the code runs with (``data`` is the data pipeline's
DataConfig). A YAML may start from another with ``base: other.yaml`` (relative to its own
folder) and state only what differs: mappings merge key by key, anything else replaces.
``MEGATRON_FLAGS`` maps every flag users know from Megatron-LM onto one field, and is the
only place flag names appear (the parallel ones come from ``config.parallel``). Validation
runs before any process-group work, looks names up in the registries (so a plugin's
packing layout or output head is accepted) and names the flag to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import yaml

from megatron_longvita.config.data import DataConfig
from megatron_longvita.config.parallel import PARALLEL_FLAGS, ConfigError, ParallelConfig
from megatron_longvita.registry import BIN_PACKERS, OUTPUT_HEADS, PACKING_LAYOUTS, UnknownNameError


@dataclass(frozen=True)
class ModelSection:
    preset: Optional[str] = None  # None: the model config of the checkpoint in --load / --save
    provider: str = "long_vita"
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_language_model: bool = False
    recompute_num_layers: int = 0
    vision_recompute_num_layers: int = 0
    lm_head: str = "full"  # an OUTPUT_HEADS name: full | chunked | masked, or a plugin's
    lm_head_chunk_size: int = 4096


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
class ScheduleConfig:
    """Learning-rate schedule in iterations (Megatron-LM's --lr-warmup-fraction, --lr-decay-style)."""

    train_iters: int = 10
    lr_warmup_fraction: float = 0.03  # the Long-VITA recipes' 3% (docs/design.md, "Training stages")
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
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    bf16: bool = False
    seed: int = 1234

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def validate(self, world_size: int, model: Optional[Any] = None) -> None:
        """Everything checkable without a process group; each error names the flag to change.

        ``model``: the ModelConfig of ``model.preset`` (the models layer resolves presets, this
        one cannot import it), checked against the layout when given.
        """
        self.parallel.validate(world_size)
        if model is not None:
            model.validate_parallel(
                self.parallel.tensor_model_parallel_size, self.parallel.pipeline_model_parallel_size
            )
        cp = self.parallel.context_parallel_size
        if cp > 1 and self.data.seq_length % (2 * cp):
            raise ConfigError(
                f"--seq-length {self.data.seq_length} is not divisible by 2 x --context-parallel-size "
                f"= {2 * cp} (zigzag chunks); use a multiple of {2 * cp}"
            )
        if self.data.packing == "reset" and self.data.micro_batch_size != 1:
            raise ConfigError(
                "reset packing keeps one packed row per micro-batch (document boundaries are per "
                "row): use --micro-batch-size 1"
            )
        dp = self.parallel.data_parallel_size(world_size)
        per_step = self.data.micro_batch_size * dp
        if self.data.global_batch_size % per_step:
            raise ConfigError(
                f"--global-batch-size {self.data.global_batch_size} is not divisible by "
                f"--micro-batch-size x data-parallel size = {self.data.micro_batch_size} x {dp}; "
                f"use a multiple of {per_step}"
            )
        for setting, registry, name in (
            ("data.packing", PACKING_LAYOUTS, self.data.packing),
            ("data.bin_packer", BIN_PACKERS, self.data.bin_packer),
            ("--lm-head", OUTPUT_HEADS, self.model.lm_head),
        ):
            try:
                registry.get(name)
            except UnknownNameError as error:
                raise ConfigError(f"{setting}: {error}") from None
        if self.schedule.train_iters < 1:
            raise ConfigError(f"--train-iters must be >= 1, got {self.schedule.train_iters}")

    def num_microbatches(self, world_size: int) -> int:
        dp = self.parallel.data_parallel_size(world_size)
        return self.data.global_batch_size // (self.data.micro_batch_size * dp)


def _flag(
    section: str, name: str, kind: type = int, action: Optional[str] = None
) -> tuple[str, str, type, Optional[str]]:
    return section, name, kind, action


# Megatron-LM flag -> (section, field, type, argparse action); a dotted section is nested
# ("data.media"). The one table of flag names; the parallel ones (and their short aliases) are
# config.parallel's PARALLEL_FLAGS.
MEGATRON_FLAGS: dict[str, tuple[str, str, type, Optional[str]]] = {
    **{
        flag: _flag(
            "parallel",
            name,
            bool if name == "sequence_parallel" else int,
            "store_true" if name == "sequence_parallel" else None,
        )
        for name, (flag, _) in PARALLEL_FLAGS.items()
    },
    "--seq-length": _flag("data", "seq_length"),
    "--micro-batch-size": _flag("data", "micro_batch_size"),
    "--global-batch-size": _flag("data", "global_batch_size"),
    "--num-workers": _flag("data", "num_workers"),
    "--data-path": _flag("data", "mixture", str),
    "--tokenizer-model": _flag("data", "tokenizer", str),
    "--max-num-frames": _flag("data.media", "max_num_frames"),
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

_SECTIONS = {
    "model": ModelSection,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "optimizer": OptimizerSection,
    "schedule": ScheduleConfig,
    "checkpoint": CheckpointSection,
    "logging": LoggingSection,
}
_ALIASES = {flag: alias for flag, alias in PARALLEL_FLAGS.values()}
BASE_KEY = "base"


def _section_from_dict(kind: type, values: dict[str, Any], where: str) -> Any:
    """``kind`` from a YAML mapping; nested dataclass fields from nested mappings."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    settable = {f.name: f for f in dataclasses.fields(kind) if "set_by" not in f.metadata}
    unknown = sorted(set(values) - set(settable))
    if unknown:
        fixed = {f.name: f.metadata["set_by"] for f in dataclasses.fields(kind) if "set_by" in f.metadata}
        not_here = {name: fixed[name] for name in unknown if name in fixed}
        if not_here:
            raise ConfigError(
                f"{where}: {sorted(not_here)} are set by the {'/'.join(sorted(set(not_here.values())))}, "
                "not in a YAML; remove them"
            )
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(settable)}")
    types = typing.get_type_hints(kind)
    built = {
        name: _section_from_dict(types[name], value, f"{where}.{name}")
        if dataclasses.is_dataclass(types[name])
        else value
        for name, value in values.items()
    }
    try:
        return kind(**built)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def config_from_dict(raw: dict[str, Any], where: str = "config") -> TrainConfig:
    unknown = sorted(set(raw) - set(_SECTIONS) - {"bf16", "seed"})
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; known: {sorted(_SECTIONS) + ['bf16', 'seed']}")
    sections = {
        name: _section_from_dict(kind, raw.get(name) or {}, f"{where}: {name}") for name, kind in _SECTIONS.items()
    }
    return TrainConfig(**sections, bf16=raw.get("bf16", False), seed=raw.get("seed", 1234))


def merge_yaml(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``: mappings merge key by key, any other value replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_yaml(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str, _including: tuple[str, ...] = ()) -> dict[str, Any]:
    """The YAML at ``path`` with its ``base:`` chain merged in (the mapping TrainConfig is built from).

    Relative data paths resolve against the folder of the YAML that writes them (flags: the CWD).
    """
    path = os.path.abspath(path)
    if path in _including:
        chain = " -> ".join([*_including, path])
        raise ConfigError(f"{path}: `base:` includes form a cycle: {chain}")
    try:
        with open(path) as handle:
            raw = yaml.safe_load(handle) or {}
    except OSError as error:
        where = f" (the `base:` of {_including[-1]})" if _including else ""
        raise ConfigError(f"{path}{where}: {error.strerror}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    folder = os.path.dirname(path)
    data = raw.get("data")
    if isinstance(data, dict):
        raw = {
            **raw,
            "data": {
                key: os.path.join(folder, value)
                if key in ("mixture", "tokenizer", "media_root") and value and not os.path.isabs(value)
                else value
                for key, value in data.items()
            },
        }
    base = raw.pop(BASE_KEY, None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: `base:` must be the path of another YAML, got {base!r}")
    return merge_yaml(read_yaml(os.path.join(folder, base), (*_including, path)), raw)


def load_yaml(path: str) -> TrainConfig:
    return config_from_dict(read_yaml(path), where=path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Long-VITA training on megatron-core")
    parser.add_argument("--config", required=True, help="stage YAML (examples/configs/)")
    for flag, (_, _, kind, action) in MEGATRON_FLAGS.items():
        destination = flag.lstrip("-").replace("-", "_")
        names = [flag, _ALIASES[flag]] if flag in _ALIASES else [flag]
        if action == "store_true":
            parser.add_argument(*names, dest=destination, action="store_true", default=None)
        elif action == "logits_mask":  # Megatron-LM style switch for the masked head
            parser.add_argument(*names, dest=destination, action="store_const", const="masked", default=None)
        else:
            parser.add_argument(*names, dest=destination, type=kind, default=None)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """The YAML named by --config, with every given Megatron flag applied on top."""
    args = build_parser().parse_args(argv)
    config = load_yaml(args.config)
    for flag, (section, name, _, _) in MEGATRON_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        config = _replace_at(config, [*section.split("."), name] if section else [name], value)
    return config


def _replace_at(node: Any, path: list[str], value: Any) -> Any:
    """``node`` with the field at the dotted ``path`` replaced (frozen dataclasses all the way down)."""
    head, *rest = path
    return dataclasses.replace(node, **{head: _replace_at(getattr(node, head), rest, value) if rest else value})
