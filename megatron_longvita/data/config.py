"""Configuration of the data pipeline (dataclasses; YAML/CLI layers fill them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ThumbnailPosition = Literal["first", "last"]
FrameFit = Literal["pad", "stretch"]


@dataclass(frozen=True)
class MediaConfig:
    """How images and videos become tiles, and how many tokens a tile costs.

    ``image_size``, ``patch_size`` and ``downsample_ratio`` must match the vision tower;
    build this with :meth:`from_model_config` so the two never drift apart.
    """

    image_size: int = 448
    patch_size: int = 14
    downsample_ratio: float = 0.5
    min_tiles: int = 1
    max_tiles: int = 12
    # The reference puts the whole-image thumbnail before the grid tiles, InternVL after.
    thumbnail_position: ThumbnailPosition = "first"
    # Video frames: the reference pads to a square with the ImageNet-mean colour, InternVL stretches.
    frame_fit: FrameFit = "pad"
    max_fps: float = 1.0
    max_num_frames: int = 128
    # A directory of frame images carries no timing; assume this rate.
    frame_dir_fps: float = 1.0
    # Decode forward instead of seeking when the next sampled frame is this close.
    seek_threshold_s: float = 2.0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        shuffled_side = self.image_size // self.patch_size * self.downsample_ratio
        if shuffled_side != int(shuffled_side) or shuffled_side < 1:
            raise ValueError(
                f"pixel shuffle ratio {self.downsample_ratio} does not divide the "
                f"{self.image_size // self.patch_size}x{self.image_size // self.patch_size} patch grid"
            )
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {self.min_tiles}, {self.max_tiles}")
        if self.thumbnail_position not in ("first", "last"):
            raise ValueError(f"thumbnail_position must be 'first' or 'last', got {self.thumbnail_position!r}")
        if self.frame_fit not in ("pad", "stretch"):
            raise ValueError(f"frame_fit must be 'pad' or 'stretch', got {self.frame_fit!r}")
        if self.max_fps <= 0 or self.frame_dir_fps <= 0 or self.max_num_frames < 1:
            raise ValueError("max_fps and frame_dir_fps must be > 0 and max_num_frames >= 1")

    @property
    def tokens_per_tile(self) -> int:
        """Vision tokens one tile yields after the encoder and pixel shuffle (256 at 448/14/0.5)."""
        return int(self.image_size // self.patch_size * self.downsample_ratio) ** 2

    @classmethod
    def from_model_config(cls, model_config: Any, **overrides: Any) -> "MediaConfig":
        """Take the geometry from any config exposing image_size, patch_size, downsample_ratio."""
        geometry = {
            name: getattr(model_config, name) for name in ("image_size", "patch_size", "downsample_ratio")
        }
        return cls(**{**geometry, **overrides})


@dataclass(frozen=True)
class DataConfig:
    """Everything needed to build the packed micro-batch stream of one data-parallel rank."""

    mixture: str
    tokenizer_dir: str
    seq_length: int
    # PACKING_SAMPLERS name: "reset" (stages 1-2) or "no_reset" (stages 3-4).
    packing: str = "reset"
    # BIN_PACKERS name: "ffd" (first-fit decreasing) or "greedy" (arrival order).
    bin_packer: str = "ffd"
    # Samples packed together as one window; bounds memory and the cost of a resume.
    pack_buffer_size: int = 1024
    micro_batch_size: int = 1
    seed: int = 1234
    dp_rank: int = 0
    dp_size: int = 1
    num_workers: int = 2
    strict: bool = False
    # Relative media paths resolve here (a group may override it); default: the record file's folder.
    media_root: str | None = None
    media: MediaConfig = field(default_factory=MediaConfig)

    def __post_init__(self) -> None:
        if self.seq_length < 2:
            raise ValueError(f"seq_length must be >= 2, got {self.seq_length}")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank {self.dp_rank} is outside dp_size {self.dp_size}")
        if self.pack_buffer_size < 1 or self.micro_batch_size < 1 or self.num_workers < 0:
            raise ValueError("pack_buffer_size and micro_batch_size must be >= 1, num_workers >= 0")
