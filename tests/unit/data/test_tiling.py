import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_longvita.data import MediaConfig
from megatron_longvita.data.tiling import IMAGENET_MEAN, IMAGENET_STD, choose_grid, num_image_tiles, tile_image


def reference_grid(width: int, height: int, size: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """The grid rule of docs/design.md, "Tiling and frames", stated differently: among the grids
    at the smallest float64 distance |width / height - cols / rows|, the largest whose pixel area
    is under twice the image area, else the smallest."""
    grids = [(c, r) for c in range(1, 13) for r in range(1, 13) if min_tiles <= c * r <= max_tiles]
    distances = {grid: abs(float(width) / float(height) - float(grid[0]) / float(grid[1])) for grid in grids}
    nearest = min(distances.values())
    tied = sorted((g for g in grids if distances[g] == nearest), key=lambda g: (g[0] * g[1], g[0]))
    large_enough = [g for g in tied[1:] if width * height > 0.5 * size * size * g[0] * g[1]]
    return large_enough[-1] if large_enough else tied[0]


def exact_fraction_grid(width: int, height: int, size: int, max_tiles: int) -> tuple[int, int]:
    """The same rule with exact rational distances (what the reference does not do)."""
    grids = [(c, r) for c in range(1, 13) for r in range(1, 13) if c * r <= max_tiles]
    grids.sort(key=lambda g: g[0] * g[1])
    distances = {grid: abs(Fraction(width, height) - Fraction(*grid)) for grid in grids}
    nearest = min(distances.values())
    tied = [g for g in grids if distances[g] == nearest]
    large_enough = [g for g in tied[1:] if width * height > 0.5 * size * size * g[0] * g[1]]
    return large_enough[-1] if large_enough else tied[0]


SIZES = [(448, 448), (672, 448), (300, 200), (1000, 200), (200, 1000), (1920, 1080), (800, 600), (448, 1344),
         (1344, 448), (50, 50), (3000, 100), (896, 448), (500, 1500), (1024, 768), (123, 456)]  # fmt: skip


@pytest.mark.parametrize("max_tiles", [1, 6, 12])
@pytest.mark.parametrize("width,height", SIZES)
def test_grid_choice_matches_reference(width: int, height: int, max_tiles: int) -> None:
    config = MediaConfig(max_tiles=max_tiles)
    assert choose_grid(width, height, config) == reference_grid(width, height, 448, 1, max_tiles)


def test_grid_choice_over_many_shapes_and_min_tiles() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        width, height = (int(x) for x in rng.integers(20, 3000, size=2))
        min_tiles = int(rng.integers(1, 4))
        config = MediaConfig(image_size=56, patch_size=14, min_tiles=min_tiles, max_tiles=12)
        assert choose_grid(width, height, config) == reference_grid(width, height, 56, min_tiles, 12)


@pytest.mark.parametrize(
    "width,height,grid,exact_grid",
    [
        (1008, 864, (4, 3), (2, 2)),  # aspect 7/6: |7/6 - 4/3| = 0.16666666666666652 < |7/6 - 1| = 0.16666666666666674
        (238, 204, (4, 3), (1, 1)),  # the same aspect, an image too small for the tie rule's larger grid
        (2448, 1728, (3, 2), (4, 3)),  # aspect 17/12, between 4/3 and 3/2; 3/2 is nearer by rounding
    ],
)
def test_float_decided_ties_follow_the_reference(width: int, height: int, grid, exact_grid) -> None:
    config = MediaConfig()
    assert abs(7 / 6 - 4 / 3) == 0.16666666666666652 and abs(7 / 6 - 1) == 0.16666666666666674
    assert choose_grid(width, height, config) == grid
    assert exact_fraction_grid(width, height, 448, 12) == exact_grid  # what exact fractions would say
    if (width, height) == (1008, 864):
        assert num_image_tiles(grid) == 13
        assert num_image_tiles(grid) * config.tokens_per_tile == 3328


def test_grid_choice_sweep_holds_to_the_float_rule() -> None:
    """Every multiple of 24 px up to 2400 x 1440 (6,000 sizes). Sizes with simple aspects sit on
    the midpoints between grid ratios, where float rounding decides; the sweep must hold such
    sizes, decided both towards the larger and the smaller grid, to mean anything."""
    config = MediaConfig()
    sizes = [(width, height) for width in range(24, 2424, 24) for height in range(24, 1464, 24)]
    assert len(sizes) == 6000
    float_decided = {"larger": 0, "smaller": 0}
    for width, height in sizes:
        expected = reference_grid(width, height, 448, 1, 12)
        assert choose_grid(width, height, config) == expected, (width, height)
        exact = exact_fraction_grid(width, height, 448, 12)
        if expected != exact:
            float_decided["larger" if expected[0] * expected[1] > exact[0] * exact[1] else "smaller"] += 1
    assert float_decided["larger"] > 0 and float_decided["smaller"] > 0, float_decided


def test_tie_prefers_larger_grid_only_for_large_images() -> None:
    config = MediaConfig(max_tiles=2)  # candidates 1:1, 1:2, 2:1
    assert choose_grid(672, 448, config) == (2, 1)  # 1.5 ties 1:1 and 2:1; area 301056 > 200704
    assert choose_grid(300, 200, config) == (1, 1)  # same tie, small image


@pytest.mark.parametrize("position", ["first", "last"])
def test_tiles_in_placeholder_order(position: str) -> None:
    config = MediaConfig(image_size=28, patch_size=14, thumbnail_position=position)
    # Four flat quadrants on a 2x2 grid: tile k must be quadrant k (row-major).
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    image = Image.new("RGB", (56, 56))
    for col, row in itertools.product(range(2), range(2)):
        image.paste(colors[row * 2 + col], (col * 28, row * 28, col * 28 + 28, row * 28 + 28))
    tiles = tile_image(image, (2, 2), config)
    assert tiles.shape == (num_image_tiles((2, 2)), 3, 28, 28) == (5, 3, 28, 28)
    grid_tiles = tiles[1:] if position == "first" else tiles[:4]
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    for tile, color in zip(grid_tiles, colors):
        expected = (torch.tensor(color) / 255.0 - mean) / std
        torch.testing.assert_close(tile[:, 14, 14], expected, atol=1e-4, rtol=0)


def test_single_tile_has_no_thumbnail() -> None:
    tiles = tile_image(Image.new("RGB", (30, 40), (10, 20, 30)), (1, 1), MediaConfig(image_size=28))
    assert tiles.shape == (1, 3, 28, 28)
    expected = (torch.tensor([10, 20, 30]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(tiles[0].mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)


def test_tokens_per_tile_follows_geometry() -> None:
    assert MediaConfig().tokens_per_tile == 256
    assert MediaConfig(image_size=56, patch_size=14, downsample_ratio=0.5).tokens_per_tile == 4
    with pytest.raises(ValueError, match="patch_size"):
        MediaConfig(image_size=50, patch_size=14)
