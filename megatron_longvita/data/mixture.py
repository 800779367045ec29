"""Per-stage data mixtures (docs/design.md, "Training stages") as one deterministic, DP-sharded sample stream.

YAML: ``dataset: {<group>: {ratio: float, num: optional cap, data_paths: [...], media_root: optional,
format: optional RECORD_FORMATS name (detected per file when absent)}}``; a data path may be a glob
(parquet shards), expanded in sorted order when the group is opened.
One mixture epoch holds round(ratio * pool) samples of each group (a group's pool is its
records, capped to a seeded subset of ``num``): ratio > 1 repeats the pool, a fractional part
draws a seeded subset, 0 skips the group. Epochs are shuffled with (seed, epoch) and repeat
forever; global position g belongs to data-parallel rank g % dp_size.
"""

from __future__ import annotations

import bisect
import glob
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml

from .schema import RECORD_FORMATS, RecordFile, open_record_file


@dataclass(frozen=True)
class MixtureGroup:
    name: str
    ratio: float
    data_paths: tuple[str, ...]
    num: int | None = None
    media_root: str | None = None
    format: str | None = None  # RECORD_FORMATS name; None: detected per file


def _group_from_yaml(name: str, raw: Any, base_dir: str, path: str) -> MixtureGroup:
    if not isinstance(raw, dict) or "data_paths" not in raw:
        raise ValueError(f"{path}: group {name!r} needs a mapping with 'data_paths'")
    unknown = set(raw) - {"ratio", "num", "data_paths", "media_root", "format"}
    if unknown:
        raise ValueError(f"{path}: group {name!r} has unknown keys {sorted(unknown)}")
    ratio = float(raw.get("ratio", 1.0))
    num = raw.get("num")
    if ratio < 0 or (num is not None and (not isinstance(num, int) or num < 0)):
        raise ValueError(f"{path}: group {name!r} needs ratio >= 0 and an integer num >= 0")
    data_paths = raw["data_paths"] if isinstance(raw["data_paths"], list) else [raw["data_paths"]]
    media_root = raw.get("media_root")
    record_format = raw.get("format")
    if record_format is not None and record_format not in RECORD_FORMATS.names():
        raise ValueError(f"{path}: group {name!r} has format {record_format!r}; known: {RECORD_FORMATS.names()}")
    return MixtureGroup(
        name=name,
        ratio=ratio,
        num=num,
        data_paths=tuple(os.path.join(base_dir, data_path) for data_path in data_paths),
        media_root=os.path.join(base_dir, media_root) if media_root else None,
        format=record_format,
    )


def expand_data_paths(group: MixtureGroup) -> list[str]:
    """The group's files: globs expanded in sorted order (an unmatched glob is an error)."""
    files = []
    for path in group.data_paths:
        if not glob.has_magic(path):
            files.append(path)
            continue
        matches = sorted(glob.glob(path))
        if not matches:
            raise ValueError(f"group {group.name!r}: data path {path} matches no file")
        files += matches
    return files


def load_mixture(path: str) -> list[MixtureGroup]:
    """Parse a mixture YAML; relative data paths and media roots resolve against its folder."""
    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    if not isinstance(raw, dict) or not isinstance(raw.get("dataset"), dict) or not raw["dataset"]:
        raise ValueError(f"{path}: expected 'dataset: {{<group>: {{ratio, num, data_paths}}}}'")
    base_dir = os.path.dirname(os.path.abspath(path))
    return [_group_from_yaml(str(name), group, base_dir, path) for name, group in raw["dataset"].items()]


@dataclass(frozen=True)
class SampleAddress:
    group: int
    file: int  # index into the group's files
    record: int  # index into that file


class MixtureStream:
    """Maps a rank-local position of the infinite mixture stream to a record address."""

    def __init__(self, groups: list[MixtureGroup], seed: int, dp_rank: int = 0, dp_size: int = 1) -> None:
        self.groups = groups
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        # Ratio-0 groups are never opened: their files may not even exist on this cluster.
        self.files: list[list[RecordFile]] = [
            [open_record_file(path, group.format) for path in expand_data_paths(group)] if group.ratio > 0 else []
            for group in groups
        ]
        self._file_starts = [np.cumsum([0] + [len(file) for file in files]) for files in self.files]
        self._pools = [self._pool(index) for index in range(len(groups))]
        self._epoch_counts = [round(group.ratio * len(pool)) for group, pool in zip(groups, self._pools)]
        self.epoch_length = sum(self._epoch_counts)
        if self.epoch_length == 0:
            raise ValueError("the mixture selects no samples (all groups empty or ratio 0)")
        self._cached_epoch: tuple[int, np.ndarray, np.ndarray] | None = None

    def _pool(self, group_index: int) -> np.ndarray:
        """Indices (over the group's concatenated files) that the group may draw from."""
        total = int(self._file_starts[group_index][-1])
        cap = self.groups[group_index].num
        if cap is None or cap >= total:
            return np.arange(total)
        rng = np.random.default_rng([self.seed, group_index])
        return np.sort(rng.choice(total, size=cap, replace=False))

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(group, pool index) of every sample of one mixture epoch, shuffled."""
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            group_ids, pool_ids = [], []
            for group_index, (pool, count) in enumerate(zip(self._pools, self._epoch_counts)):
                repeats, remainder = divmod(count, len(pool)) if len(pool) else (0, 0)
                rng = np.random.default_rng([self.seed, epoch, group_index])
                chosen = np.concatenate([np.tile(pool, repeats), rng.choice(pool, size=remainder, replace=False)])
                group_ids.append(np.full(len(chosen), group_index))
                pool_ids.append(chosen)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.epoch_length)
            self._cached_epoch = (epoch, np.concatenate(group_ids)[order], np.concatenate(pool_ids)[order])
        return self._cached_epoch[1], self._cached_epoch[2]

    def global_position(self, local_position: int) -> int:
        return local_position * self.dp_size + self.dp_rank

    def locate(self, local_position: int) -> SampleAddress:
        epoch, offset = divmod(self.global_position(local_position), self.epoch_length)
        group_ids, pool_ids = self._epoch(epoch)
        group, index = int(group_ids[offset]), int(pool_ids[offset])
        file = bisect.bisect_right(self._file_starts[group], index) - 1
        return SampleAddress(group, file, index - int(self._file_starts[group][file]))

    def local_epoch_length(self) -> int:
        """Positions of one mixture epoch that fall on this rank."""
        return len(range(self.dp_rank, self.epoch_length, self.dp_size))
