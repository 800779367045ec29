"""Configuration of the data pipeline: the stage YAML's ``data`` section is a DataConfig.

Fields marked ``set_by`` are not written in a YAML: ``"model"`` fields are the vision
tower's geometry (taken from the model preset by :meth:`MediaConfig.with_geometry_of`),
``"launcher"`` fields are filled by the training driver (seed, data-parallel rank and size).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Optional

from megatron_longvita.config.parallel import ConfigError

ThumbnailPosition = Literal["first", "last"]
FrameFit = Literal["pad", "stretch"]
_FROM_MODEL = {"set_by": "model"}
_FROM_LAUNCHER = {"set_by": "launcher"}


@dataclass(frozen=True)
class MediaConfig:
    """How images and videos become tiles, and how many tokens a tile costs.

    ``image_size``, ``patch_size`` and ``downsample_ratio`` must match the vision tower;
    take them from the model with :meth:`with_geometry_of` so the two never drift apart.
    """

    image_size: int = field(default=448, metadata=_FROM_MODEL)
    patch_size: int = field(default=14, metadata=_FROM_MODEL)
    downsample_ratio: float = field(default=0.5, metadata=_FROM_MODEL)
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
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        shuffled_side = self.image_size // self.patch_size * self.downsample_ratio
        if shuffled_side != int(shuffled_side) or shuffled_side < 1:
            raise ConfigError(
                f"pixel shuffle ratio {self.downsample_ratio} does not divide the "
                f"{self.image_size // self.patch_size}x{self.image_size // self.patch_size} patch grid"
            )
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ConfigError(f"need 1 <= min_tiles <= max_tiles, got {self.min_tiles}, {self.max_tiles}")
        if self.thumbnail_position not in ("first", "last"):
            raise ConfigError(f"thumbnail_position must be 'first' or 'last', got {self.thumbnail_position!r}")
        if self.frame_fit not in ("pad", "stretch"):
            raise ConfigError(f"frame_fit must be 'pad' or 'stretch', got {self.frame_fit!r}")
        if self.max_fps <= 0 or self.frame_dir_fps <= 0 or self.max_num_frames < 1:
            raise ConfigError("max_fps and frame_dir_fps must be > 0 and max_num_frames >= 1 (--max-num-frames)")

    @property
    def tokens_per_tile(self) -> int:
        """Vision tokens one tile yields after the encoder and pixel shuffle (256 at 448/14/0.5)."""
        return int(self.image_size // self.patch_size * self.downsample_ratio) ** 2

    @classmethod
    def from_model_config(cls, model_config: Any, **overrides: Any) -> MediaConfig:
        """Defaults with the geometry of ``model_config`` (see :meth:`with_geometry_of`)."""
        return cls(**overrides).with_geometry_of(model_config)

    def with_geometry_of(self, model_config: Any) -> MediaConfig:
        """This config with image_size, patch_size and downsample_ratio taken from any config exposing them."""
        return replace(self, **{name: getattr(model_config, name) for name in GEOMETRY})


GEOMETRY = ("image_size", "patch_size", "downsample_ratio")


@dataclass(frozen=True)
class DataConfig:
    """Everything needed to build the packed micro-batch stream of one data-parallel rank."""

    mixture: Optional[str] = None  # stage mixture YAML (--data-path)
    tokenizer: Optional[str] = None  # Hugging Face tokenizer directory (--tokenizer-model)
    seq_length: int = 4096
    # a PACKING_LAYOUTS name: "reset" (stages 1-2) or "no_reset" (stages 3-4)
    packing: str = "reset"
    # a BIN_PACKERS name: "ffd" (first-fit decreasing) or "greedy" (arrival order)
    bin_packer: str = "ffd"
    # Samples packed together as one window; bounds memory and the cost of a resume.
    pack_buffer_size: int = 1024
    micro_batch_size: int = 1
    global_batch_size: int = 1  # the training step's; the loader yields micro-batches
    num_workers: int = 2
    strict: bool = False
    # Relative media paths resolve here (a group may override it); default: the record file's folder.
    media_root: Optional[str] = None
    media: MediaConfig = field(default_factory=MediaConfig)
    seed: int = field(default=1234, metadata=_FROM_LAUNCHER)
    dp_rank: int = field(default=0, metadata=_FROM_LAUNCHER)
    dp_size: int = field(default=1, metadata=_FROM_LAUNCHER)

    def __post_init__(self) -> None:
        if self.seq_length < 2:
            raise ConfigError(f"--seq-length must be >= 2, got {self.seq_length}")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ConfigError(f"dp_rank {self.dp_rank} is outside dp_size {self.dp_size}")
        if self.pack_buffer_size < 1 or self.micro_batch_size < 1 or self.num_workers < 0:
            raise ConfigError("pack_buffer_size and micro_batch_size must be >= 1, num_workers >= 0")

    def for_rank(self, model_config: Any, seed: int, dp_rank: int, dp_size: int) -> DataConfig:
        """The launcher's fields filled in and the media geometry taken from the model."""
        return replace(
            self, media=self.media.with_geometry_of(model_config), seed=seed, dp_rank=dp_rank, dp_size=dp_size
        )
