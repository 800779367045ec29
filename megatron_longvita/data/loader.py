"""The packed micro-batch stream of one data-parallel rank, resumable exactly.

Two worker pools keep decoding off the training critical path:

1. ``SampleSource`` workers turn stream positions into ``PreparedSample``s: record parsing,
   tokenisation and media *headers* (enough to know each sample's token count).
2. The main process packs a window of ``pack_buffer_size`` prepared samples into rows
   (cheap: lengths only) and hands each micro-batch plan to ``MicroBatchBuilder`` workers,
   which decode and tile the media and lay the rows out.

Packing never looks across windows, so the iterator state is just (window, micro-batches
already taken from it): a resume re-prepares that one window and drops what was taken.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from megatron_longvita.config.data import DataConfig
from megatron_longvita.config.parallel import ConfigError
from megatron_longvita.registry import BIN_PACKERS, PACKING_LAYOUTS

from .mixture import MixtureStream, load_mixture
from .packing import build_micro_batch
from .sample import PreparedSample, load_media_pixels, prepare_sample
from .skips import BadSampleError, Skip, count_by_reason, handle_bad_sample
from .template import ChatTokenizer
from .tiling import empty_tiles

logger = logging.getLogger(__name__)

STATE_VERSION = 1
# Fields that must match for a saved position to mean the same batches.
_STATE_KEYS = ("seed", "dp_rank", "dp_size", "seq_length", "pack_buffer_size", "micro_batch_size", "bin_packer")
_PREPARE_CHUNK = 16


class SampleSource(Dataset):
    """Rank-local stream position -> PreparedSample, or the Skip explaining why not."""

    def __init__(self, stream: MixtureStream, tokenizer: ChatTokenizer, config: DataConfig) -> None:
        self.stream = stream
        self.tokenizer = tokenizer
        self.config = config

    def __getitem__(self, position: int) -> PreparedSample | Skip:
        address = self.stream.locate(position)
        group = self.stream.groups[address.group]
        record_file = self.stream.files[address.group][address.file]
        media_root = group.media_root or self.config.media_root or os.path.dirname(os.path.abspath(record_file.path))
        try:
            record = record_file.read(address.record)
            return prepare_sample(
                record, group.name, media_root, self.tokenizer, self.config.media, self.config.seq_length
            )
        except BadSampleError as error:
            return handle_bad_sample(error, self.config.strict, group.name)


@dataclass
class MicroBatchPlan:
    window: int
    index: int  # within the window
    rows: list[list[PreparedSample]]
    skips: list[Skip] = field(default_factory=list)  # found while preparing, reported with this batch
    is_last_in_window: bool = False


def plan_window(
    window: int, items: list[PreparedSample | Skip], config: DataConfig, carried_skips: list[Skip]
) -> list[MicroBatchPlan]:
    """Bin-pack one window; the window's skips (and any carried in) ride on its first plan."""
    samples = [item for item in items if isinstance(item, PreparedSample)]
    skips = carried_skips + [item for item in items if isinstance(item, Skip)]
    bins = BIN_PACKERS.get(config.bin_packer)([len(sample) for sample in samples], config.seq_length)
    rows = [[samples[index] for index in row] for row in bins]
    size = config.micro_batch_size
    rows += [[]] * (-len(rows) % size)  # all-padding rows keep the micro-batch shape fixed
    starts = range(0, len(rows), size)
    plans = [MicroBatchPlan(window, index, rows[start : start + size]) for index, start in enumerate(starts)]
    if plans:
        plans[0].skips = skips
        plans[-1].is_last_in_window = True
    return plans


class _Positions:
    """Sampler over the infinite rank-local stream from a start position."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


def _identity(items: Any) -> Any:
    """collate_fn: keep lists of prepared samples and finished micro-batches as they are."""
    return items


class MicroBatchBuilder(Dataset):
    """Micro-batch plan -> micro-batch (runs in workers: all media decoding happens here)."""

    def __init__(self, config: DataConfig, pad_id: int) -> None:
        self.config = config
        self.pad_id = pad_id
        self.layout = PACKING_LAYOUTS.get(config.packing)

    def __getitem__(self, plan: MicroBatchPlan) -> dict:
        rows: list[list[PreparedSample]] = []
        pixels: list[torch.Tensor] = []
        skips: list[Skip] = []
        for row in plan.rows:
            kept = []
            for sample in row:
                try:
                    pixels.append(load_media_pixels(sample.media, self.config.media, sample.location))
                    kept.append(sample)
                except BadSampleError as error:  # decodes failed after the header looked fine
                    skips.append(handle_bad_sample(error, self.config.strict, sample.group))
            rows.append(kept)
        pixel_values = torch.cat(pixels) if pixels else empty_tiles(self.config.media)
        batch = build_micro_batch(rows, pixel_values, self.config.seq_length, self.layout, self.pad_id)
        batch["stats"] = {
            "skipped": count_by_reason(skips),
            "real_tokens": sum(len(sample) for row in rows for sample in row),
            "samples": sum(len(row) for row in rows),
        }
        return batch


class PackedDataLoader:
    """Iterable of packed micro-batches (the data -> model contract) with exact resume."""

    def __init__(self, config: DataConfig, tokenizer: ChatTokenizer | None = None) -> None:
        if not config.mixture or (tokenizer is None and not config.tokenizer):
            raise ConfigError(
                "set the data mixture (data.mixture / --data-path) and the tokenizer "
                "(data.tokenizer / --tokenizer-model)"
            )
        self.config = config
        self.tokenizer = tokenizer or ChatTokenizer.from_dir(config.tokenizer)
        PACKING_LAYOUTS.get(config.packing)  # fail at construction on an unknown name
        BIN_PACKERS.get(config.bin_packer)
        self.stream = MixtureStream(load_mixture(config.mixture), config.seed, config.dp_rank, config.dp_size)
        self.source = SampleSource(self.stream, self.tokenizer, config)
        self.window = 0
        self.taken_in_window = 0
        self.skipped_total: Counter[str] = Counter()

    @property
    def tokens_per_tile(self) -> int:
        return self.config.media.tokens_per_tile

    def prepared_windows(self, start_window: int) -> Iterator[tuple[int, list[PreparedSample | Skip]]]:
        """(window, prepared items) from ``start_window`` on, prepared by worker processes."""
        window_size = self.config.pack_buffer_size
        workers = 1 if self.config.num_workers else 0
        loader = DataLoader(
            self.source,
            sampler=_Positions(start_window * window_size),
            batch_size=_PREPARE_CHUNK,
            collate_fn=_identity,
            num_workers=workers,
        )
        items = itertools.chain.from_iterable(loader)
        for window in itertools.count(start_window):
            yield window, list(itertools.islice(items, window_size))

    def plans(self, start_window: int = 0, skip_in_first_window: int = 0) -> Iterator[MicroBatchPlan]:
        carried: list[Skip] = []
        for window, items in self.prepared_windows(start_window):
            plans = plan_window(window, items, self.config, carried)
            carried = [] if plans else carried + [item for item in items if isinstance(item, Skip)]
            if window == start_window:
                plans = plans[skip_in_first_window:]
            yield from plans

    def __iter__(self) -> Iterator[dict]:
        in_flight: deque[MicroBatchPlan] = deque()

        def tracked_plans() -> Iterator[MicroBatchPlan]:
            for plan in self.plans(self.window, self.taken_in_window):
                # Workers get the plan without the skip list; main reports it with the batch.
                in_flight.append(plan)
                yield MicroBatchPlan(plan.window, plan.index, plan.rows)

        loader = DataLoader(
            MicroBatchBuilder(self.config, self.tokenizer.pad_id),
            sampler=tracked_plans(),
            batch_size=None,
            collate_fn=_identity,
            num_workers=self.config.num_workers,
        )
        for batch in loader:
            plan = in_flight.popleft()  # DataLoader keeps sampler order
            skipped = Counter(batch["stats"]["skipped"]) + Counter(count_by_reason(plan.skips))
            batch["stats"]["skipped"] = dict(skipped)
            self.skipped_total.update(skipped)
            self.window, self.taken_in_window = (
                (plan.window + 1, 0) if plan.is_last_in_window else (plan.window, plan.index + 1)
            )
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Small and JSON-serialisable; position counts micro-batches handed out, not prefetched."""
        return {
            "version": STATE_VERSION,
            "window": self.window,
            "taken_in_window": self.taken_in_window,
            "consumed_samples": self.window * self.config.pack_buffer_size,
            "skipped_total": dict(self.skipped_total),
            "config": {key: asdict(self.config)[key] for key in _STATE_KEYS},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')} is not {STATE_VERSION}")
        current = {key: asdict(self.config)[key] for key in _STATE_KEYS}
        saved = state["config"]
        changed = {key: (saved[key], value) for key, value in current.items() if saved[key] != value}
        if changed:
            raise ValueError(f"cannot resume: data settings changed since the state was saved (saved, now): {changed}")
        self.window = int(state["window"])
        self.taken_in_window = int(state["taken_in_window"])
        self.skipped_total = Counter(state["skipped_total"])


def build_data_loader(config: DataConfig) -> PackedDataLoader:
    """Entry point for training: one rank's packed micro-batch stream."""
    logger.info(
        "data: mixture %s, seq_length %d, packing %s/%s, dp %d/%d, %d workers",
        config.mixture, config.seq_length, config.packing, config.bin_packer, config.dp_rank, config.dp_size,
        config.num_workers,
    )  # fmt: skip
    return PackedDataLoader(config)
