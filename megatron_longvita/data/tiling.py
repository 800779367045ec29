"""Dynamic tiling of images, square fitting of video frames and the ImageNet normalisation of
tiles, as the Long-VITA preprocessing does them (docs/design.md, "Tiling and frames")."""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from PIL import Image

from megatron_longvita.config.data import MediaConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Grid = tuple[int, int]  # (cols, rows)


@cache
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[Grid, ...]:
    """All (cols, rows) with min_tiles <= cols * rows <= max_tiles, smallest area first."""
    grids = [
        (cols, rows)
        for cols in range(1, max_tiles + 1)
        for rows in range(1, max_tiles // cols + 1)
        if cols * rows >= min_tiles
    ]
    return tuple(sorted(grids, key=lambda grid: (grid[0] * grid[1], grid[0])))


def choose_grid(width: int, height: int, config: MediaConfig) -> Grid:
    """The grid whose aspect ratio is closest to the image's.

    Distances are float64 ``abs(width / height - cols / rows)``, as the reference computes them:
    rounding decides some near-ties (aspect 7/6 is nearer 4/3 than 1 by one ulp, so 4x3, not
    2x2). On an exact float tie the larger grid wins when the image area exceeds half of that
    grid's pixel area.
    """
    aspect = width / height
    grids = candidate_grids(config.min_tiles, config.max_tiles)
    best = grids[0]
    best_difference = abs(aspect - best[0] / best[1])
    for cols, rows in grids[1:]:
        difference = abs(aspect - cols / rows)
        if difference < best_difference:
            best, best_difference = (cols, rows), difference
        elif difference == best_difference and width * height > 0.5 * config.image_size**2 * cols * rows:
            best = (cols, rows)
    return best


def num_image_tiles(grid: Grid) -> int:
    """Grid tiles plus the thumbnail that accompanies any multi-tile grid."""
    cols, rows = grid
    return 1 if cols * rows == 1 else cols * rows + 1


def normalize(images: list[Image.Image]) -> torch.Tensor:
    """RGB images of equal size -> [n, 3, H, W] float32 with ImageNet statistics."""
    pixels = torch.from_numpy(np.stack([np.asarray(image, dtype=np.uint8) for image in images]))
    pixels = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return pixels.sub_(mean).div_(std)


def empty_tiles(config: MediaConfig) -> torch.Tensor:
    """[0, 3, S, S]: the pixel values of a micro-batch without media."""
    return torch.empty(0, 3, config.image_size, config.image_size)


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Stretch to size x size (grid tiles and thumbnails in both preprocessings)."""
    return image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def frame_pad_colour() -> tuple[int, int, int]:
    """The ImageNet mean as 8-bit RGB, truncated as the reference does: (123, 116, 103)."""
    return tuple(int(channel * 255) for channel in IMAGENET_MEAN)


def pad_to_square(image: Image.Image) -> Image.Image:
    """Centre the image on a square canvas of its longer side filled with frame_pad_colour()."""
    image = image.convert("RGB")
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), frame_pad_colour())
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def fit_frame(frame: Image.Image, config: MediaConfig) -> Image.Image:
    """One video frame -> one tile: padded to a square first ("pad", Long-VITA) or stretched
    ("stretch", InternVL)."""
    if config.frame_fit == "pad":
        frame = pad_to_square(frame)
    return resize_square(frame, config.image_size)


def tile_image(image: Image.Image, grid: Grid, config: MediaConfig) -> torch.Tensor:
    """[num_image_tiles(grid), 3, S, S] in placeholder order (thumbnail first or last)."""
    size = config.image_size
    cols, rows = grid
    if cols * rows == 1:
        return normalize([resize_square(image, size)])
    resized = image.convert("RGB").resize((cols * size, rows * size), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((col * size, row * size, (col + 1) * size, (row + 1) * size))
        for row in range(rows)
        for col in range(cols)
    ]
    thumbnail = resize_square(image, size)
    ordered = [thumbnail, *tiles] if config.thumbnail_position == "first" else [*tiles, thumbnail]
    return normalize(ordered)
