"""Media of one sample: cheap planning (headers and metadata fix the tile count, hence the
token count used for packing) and the expensive load into tiles (in DataLoader workers)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Union

import torch
from PIL import Image, UnidentifiedImageError

from megatron_longvita.config.data import MediaConfig

from .schema import EmbeddedImage
from .skips import MediaError, SkipReason
from .tiling import Grid, choose_grid, fit_frame, normalize, num_image_tiles, tile_image
from .video import decode_frames_at, probe_video_times, sample_frame_files


def resolve_media_path(path: str, media_root: str) -> str:
    resolved = path if os.path.isabs(path) else os.path.join(media_root, path)
    if not os.path.exists(resolved):
        raise MediaError(SkipReason.MISSING_MEDIA, f"{resolved} does not exist")
    return resolved


def _open_image(source: str | EmbeddedImage) -> Image.Image:
    name = source.name if isinstance(source, EmbeddedImage) else source
    try:
        return Image.open(io.BytesIO(source.data) if isinstance(source, EmbeddedImage) else source)
    except (UnidentifiedImageError, OSError) as error:
        raise MediaError(SkipReason.CORRUPT_MEDIA, f"cannot read image {name}: {error}") from None


@dataclass(frozen=True)
class ImageItem:
    path: str | EmbeddedImage  # a file, or bytes from the record file (decoded in the worker)
    grid: Grid

    @property
    def num_tiles(self) -> int:
        return num_image_tiles(self.grid)

    def load(self, config: MediaConfig) -> torch.Tensor:
        with _open_image(self.path) as image:
            try:
                image.load()
            except OSError as error:  # a valid header over truncated or corrupt data
                name = self.path.name if isinstance(self.path, EmbeddedImage) else self.path
                raise MediaError(SkipReason.CORRUPT_MEDIA, f"cannot decode image {name}: {error}") from None
            return tile_image(image, self.grid, config)


@dataclass(frozen=True)
class VideoFileItem:
    path: str
    times: tuple[float, ...]

    @property
    def num_tiles(self) -> int:
        return len(self.times)

    def load(self, config: MediaConfig) -> torch.Tensor:
        decoded = decode_frames_at(self.path, list(self.times), config.seek_threshold_s)
        return normalize([fit_frame(frame, config) for frame in decoded.frames])


@dataclass(frozen=True)
class FrameDirectoryItem:
    frame_files: tuple[str, ...]

    @property
    def num_tiles(self) -> int:
        return len(self.frame_files)

    def load(self, config: MediaConfig) -> torch.Tensor:
        tiles = []
        for path in self.frame_files:
            with _open_image(path) as frame:
                try:
                    tiles.append(fit_frame(frame, config))
                except OSError as error:
                    raise MediaError(SkipReason.CORRUPT_MEDIA, f"cannot decode frame {path}: {error}") from None
        return normalize(tiles)


MediaItem = Union[ImageItem, VideoFileItem, FrameDirectoryItem]
VideoItem = Union[VideoFileItem, FrameDirectoryItem]


def plan_image(source: str | EmbeddedImage, config: MediaConfig) -> ImageItem:
    """Read the header only: the size fixes the grid and so the token count."""
    with _open_image(source) as image:
        width, height = image.size
    return ImageItem(source, choose_grid(width, height, config))


def plan_video(path: str, config: MediaConfig) -> VideoItem:
    if os.path.isdir(path):
        return FrameDirectoryItem(tuple(sample_frame_files(path, config)))
    return VideoFileItem(path, tuple(probe_video_times(path, config)))
