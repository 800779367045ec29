import math

import numpy as np
import pytest

from megatron_longvita.data import MediaConfig
from megatron_longvita.data.media import plan_video
from megatron_longvita.data.video import decode_frames_at, list_frame_files, probe_video_times, sample_times

from .factories import frame_color, make_frame_dir, make_video


def expected_indices(num_frames: int, fps: float, max_fps: float, max_frames: int) -> list[int]:
    """Straightforward rule: n = min(max_frames, floor(duration * max_fps) or 1, num_frames) frames at
    the centres of n equal slices; the frame on screen at time t is floor(t * fps)."""
    duration = num_frames / fps
    n = min(max_frames, max(1, math.floor(duration * max_fps)), num_frames)
    return [math.floor(duration * (k + 0.5) / n * fps) for k in range(n)]


def closest_frame(pixel, num_frames: int) -> int:
    return int(np.argmin([np.abs(np.subtract(pixel, frame_color(i))).sum() for i in range(num_frames)]))


@pytest.mark.parametrize("max_fps,max_frames", [(1.0, 8), (1.0, 3), (0.25, 100), (5.0, 4)])
def test_frame_directory_sampling(tmp_path, max_fps: float, max_frames: int) -> None:
    directory = make_frame_dir(str(tmp_path / "frames"), 12)
    config = MediaConfig(image_size=28, max_fps=max_fps, max_num_frames=max_frames, frame_dir_fps=2.0)
    item = plan_video(directory, config)
    indices = [int(path.rsplit("_", 1)[1].split(".")[0]) for path in item.frame_files]
    assert indices == expected_indices(12, 2.0, max_fps, max_frames)
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


def test_sample_times_respects_caps() -> None:
    config = MediaConfig(max_fps=1.0, max_num_frames=4)
    assert sample_times(10.0, 100, config) == [1.25, 3.75, 6.25, 8.75]
    assert sample_times(0.3, 100, config) == [0.15]  # at least one frame
    assert len(sample_times(3.0, 2, config)) == 2  # never more than the video has
