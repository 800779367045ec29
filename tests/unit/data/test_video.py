import os

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_longvita.data import MediaConfig
from megatron_longvita.data.media import FrameDirectoryItem, plan_video
from megatron_longvita.data.video import (
    decode_frames_at,
    list_frame_files,
    probe_video_times,
    sample_directory_indices,
    sample_frame_indices,
)

from .factories import frame_color, make_frame_dir, make_video

IMAGENET_MEAN_RGB8 = (123, 116, 103)  # floor(255 x (0.485, 0.456, 0.406))


def expected_indices(num_frames: int, fps: float, max_fps: float, max_frames: int) -> list[int]:
    """Video files: walk frame 0, s, 2s, ... (s = the larger of fps / max_fps and
    num_frames / (max_frames + 1), truncated to whole frames) for at most max_frames steps,
    stopping at the end of the video."""
    stride = max(fps / max_fps, num_frames / (max_frames + 1))
    indices = []
    for step in range(max_frames):
        position = int(step * stride)
        if position >= num_frames:
            break
        indices.append(position)
    return indices


def expected_directory_indices(num_files: int, assumed_fps: float, max_fps: float, max_frames: int) -> list[int]:
    """Frame directories: floor(seconds x max_fps) frames (capped, at least one, at most one per
    file) at a whole-file stride of floor(num_files / count)."""
    count = int(min(num_files / assumed_fps * max_fps, max_frames))
    count = min(max(count, 1), num_files)
    return list(range(0, (num_files // count) * count, num_files // count))


def closest_frame(pixel, num_frames: int) -> int:
    return int(np.argmin([np.abs(np.subtract(pixel, frame_color(i))).sum() for i in range(num_frames)]))


@pytest.mark.parametrize("max_fps,max_frames", [(1.0, 8), (1.0, 3), (0.25, 100), (5.0, 4)])
def test_frame_directory_sampling(tmp_path, max_fps: float, max_frames: int) -> None:
    directory = make_frame_dir(str(tmp_path / "frames"), 12)
    config = MediaConfig(image_size=28, max_fps=max_fps, max_num_frames=max_frames, frame_dir_fps=2.0)
    item = plan_video(directory, config)
    indices = [int(path.rsplit("_", 1)[1].split(".")[0]) for path in item.frame_files]
    assert indices == expected_directory_indices(12, 2.0, max_fps, max_frames)
    assert item.load(config).shape == (len(indices), 3, 28, 28)


def test_frame_directory_natural_order(tmp_path) -> None:
    directory = make_frame_dir(str(tmp_path / "frames"), 12)
    assert [path.rsplit("/", 1)[1] for path in list_frame_files(directory)][8:11] == [
        "frame_8.png", "frame_9.png", "frame_10.png"
    ]  # fmt: skip


@pytest.mark.parametrize("max_fps,max_frames", [(1.0, 8), (1.0, 64), (4.0, 16), (10.0, 200)])
def test_video_file_picks_the_right_frames(tmp_path, max_fps: float, max_frames: int) -> None:
    fps, num_frames = 10, 120
    path = make_video(str(tmp_path / "v.mp4"), num_frames, fps=fps, gop=10)
    config = MediaConfig(image_size=28, max_fps=max_fps, max_num_frames=max_frames)
    times = probe_video_times(path, config)
    decoded = decode_frames_at(path, times, config.seek_threshold_s)
    chosen = [closest_frame(frame.getpixel((16, 16)), num_frames) for frame in decoded.frames]
    assert chosen == expected_indices(num_frames, fps, max_fps, max_frames)


def test_seeking_skips_most_of_a_long_video(tmp_path) -> None:
    fps, num_frames = 25, 2000  # 80 s; keyframe every second
    path = make_video(str(tmp_path / "long.mp4"), num_frames, fps=fps, size=16, gop=25)
    config = MediaConfig(image_size=28, max_fps=1.0, max_num_frames=8)
    times = probe_video_times(path, config)
    decoded = decode_frames_at(path, times, config.seek_threshold_s)
    assert len(decoded.frames) == 8
    # Each target costs at most one GOP (+ the frame past it) of decoding.
    assert decoded.frames_decoded <= 8 * 27
    assert decoded.frames_decoded < num_frames / 5
    chosen = [closest_frame(frame.getpixel((8, 8)), num_frames) for frame in decoded.frames]
    assert chosen == expected_indices(num_frames, fps, 1.0, 8)
    # Sequential decoding (no seek) gives the same frames.
    sequential = decode_frames_at(path, times, seek_threshold_s=1e9)
    assert sequential.frames_decoded > decoded.frames_decoded
    assert [f.getpixel((8, 8)) for f in sequential.frames] == [f.getpixel((8, 8)) for f in decoded.frames]


def test_seven_frames_at_two_fps_give_frames_0_2_4_6(tmp_path) -> None:
    """The reference's count is ceil(duration x max_fps) from frame 0: 3.5 s -> 4 frames."""
    config = MediaConfig(image_size=28, max_fps=1.0, max_num_frames=128)
    assert sample_frame_indices(7, 2.0, config) == [0, 2, 4, 6]
    path = make_video(str(tmp_path / "seven.mp4"), 7, fps=2, gop=3)
    item = plan_video(path, config)
    assert item.num_tiles == 4
    decoded = decode_frames_at(path, list(item.times), config.seek_threshold_s)
    assert [closest_frame(frame.getpixel((16, 16)), 7) for frame in decoded.frames] == [0, 2, 4, 6]


def test_seven_frame_directory_at_two_fps_gives_frames_0_2_4(tmp_path) -> None:
    """Directories keep the reference's own rule: floor(3.5 s x 1 fps) = 3 frames at stride 2."""
    config = MediaConfig(image_size=28, max_fps=1.0, max_num_frames=128, frame_dir_fps=2.0)
    item = plan_video(make_frame_dir(str(tmp_path / "frames"), 7), config)
    assert [int(path.rsplit("_", 1)[1].split(".")[0]) for path in item.frame_files] == [0, 2, 4]


@pytest.mark.parametrize("max_fps", [0.5, 1.0, 2.0, 30.0])
@pytest.mark.parametrize("max_frames", [1, 4, 16, 128])
def test_frame_index_rules_over_many_lengths(max_fps: float, max_frames: int) -> None:
    for fps in (1.0, 2.0, 24.0, 29.97, 30.0):
        config = MediaConfig(max_fps=max_fps, max_num_frames=max_frames, frame_dir_fps=fps)
        for num_frames in range(1, 400, 7):
            assert sample_frame_indices(num_frames, fps, config) == expected_indices(
                num_frames, fps, max_fps, max_frames
            ), (num_frames, fps)
            assert sample_directory_indices(num_frames, config) == expected_directory_indices(
                num_frames, fps, max_fps, max_frames
            ), (num_frames, fps)


def normalised(pixels_rgb8: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [3, H, W] float with the ImageNet statistics."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((pixels_rgb8 / 255.0 - mean) / std).transpose(2, 0, 1)


@pytest.mark.parametrize("width,height", [(60, 30), (30, 60), (61, 30)])
def test_non_square_frame_is_padded_with_the_mean_colour(tmp_path, width: int, height: int) -> None:
    os.makedirs(tmp_path / "frames")
    content = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(content).save(tmp_path / "frames" / "frame_0.png")
    config = MediaConfig(image_size=28, patch_size=14)
    tiles = FrameDirectoryItem((str(tmp_path / "frames" / "frame_0.png"),)).load(config)

    # Independently: a square canvas of the mean colour, the frame centred on it, one bicubic resize.
    side = max(width, height)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = IMAGENET_MEAN_RGB8
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = content
    resized = np.asarray(Image.fromarray(canvas).resize((28, 28), Image.Resampling.BICUBIC))
    torch.testing.assert_close(tiles[0], torch.from_numpy(normalised(resized)).float(), atol=1e-5, rtol=0)

    # The band far from the frame (beyond the bicubic support) is exactly the mean colour.
    band = tiles[0, :, :3, :] if width > height else tiles[0, :, :, :3]
    expected = torch.from_numpy(normalised(np.array(IMAGENET_MEAN_RGB8, dtype=np.uint8).reshape(1, 1, 3))).float()
    torch.testing.assert_close(band, expected.expand_as(band), atol=1e-6, rtol=0)


def test_video_file_frames_are_padded_and_stretch_is_an_option(tmp_path) -> None:
    path = make_video(str(tmp_path / "wide.mp4"), 4, fps=1, size=64, height=32)
    mean_colour = torch.from_numpy(normalised(np.array(IMAGENET_MEAN_RGB8, dtype=np.uint8).reshape(1, 1, 3))).float()
    padded_config = MediaConfig(image_size=28, patch_size=14)
    padded = plan_video(path, padded_config).load(padded_config)
    assert padded.shape == (4, 3, 28, 28)
    torch.testing.assert_close(padded[:, :, :3, :], mean_colour.expand(4, 3, 3, 28), atol=1e-6, rtol=0)
    stretch_config = MediaConfig(image_size=28, patch_size=14, frame_fit="stretch")
    stretched = plan_video(path, stretch_config).load(stretch_config)
    for index, tile in enumerate(stretched):  # flat frames stay flat, content reaches the top row
        expected = torch.from_numpy(normalised(np.array(frame_color(index), dtype=np.uint8).reshape(1, 1, 3)))
        torch.testing.assert_close(tile[:, 0, 14], expected.float().reshape(3), atol=0.1, rtol=0)
    with pytest.raises(ValueError, match="frame_fit"):
        MediaConfig(frame_fit="crop")
