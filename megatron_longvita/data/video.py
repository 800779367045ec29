"""Video frame sampling as the Long-VITA preprocessing does it (docs/design.md, "Tiling and
frames"), decoded with seeking so a long video is not decoded frame by frame."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import av
from PIL import Image

from megatron_longvita.config.data import MediaConfig

from .skips import MediaError, SkipReason

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def natural_sort_key(name: str) -> list[int | str]:
    """'frame_10' sorts after 'frame_9'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def sample_frame_indices(num_frames: int, fps: float, config: MediaConfig) -> list[int]:
    """Indices of the frames a video file contributes.

    Stride ``max(fps / max_fps, n / (N + 1))`` from frame 0, ``N = max_num_frames`` steps, indices
    past the end dropped: ceil(duration x max_fps) frames below the cap (7 frames at 2 fps -> 0, 2, 4, 6).
    """
    step = max(fps / config.max_fps, num_frames / (config.max_num_frames + 1))
    return [index for index in (int(step * i) for i in range(config.max_num_frames)) if index < num_frames]


def sample_directory_indices(num_files: int, config: MediaConfig) -> list[int]:
    """Indices of the frames a frame directory contributes (the reference's own directory rule).

    ``count = floor(min(num_files / frame_dir_fps x max_fps, max_num_frames))`` frames at the
    integer stride ``floor(num_files / count)`` from frame 0 (7 frames at 2 fps -> 0, 2, 4). A
    directory too short for one frame at ``max_fps`` gives its first frame (the reference fails), and
    ``max_fps > frame_dir_fps`` gives each file once (the reference repeats frame 0).
    """
    count = int(min(num_files / config.frame_dir_fps * config.max_fps, config.max_num_frames, num_files))
    count = max(1, count)
    stride = num_files // count
    return [stride * i for i in range(count)]


def list_frame_files(directory: str) -> list[str]:
    names = sorted(
        (name for name in os.listdir(directory) if name.lower().endswith(FRAME_EXTENSIONS)), key=natural_sort_key
    )
    return [os.path.join(directory, name) for name in names]


def sample_frame_files(directory: str, config: MediaConfig) -> list[str]:
    files = list_frame_files(directory)
    if not files:
        raise MediaError(SkipReason.NO_VIDEO_FRAMES, f"frame directory {directory} holds no frame images")
    return [files[index] for index in sample_directory_indices(len(files), config)]


def probe_video_times(path: str, config: MediaConfig) -> list[float]:
    """Timestamps (seconds) inside the display interval of each frame to sample, from container
    metadata only: the middle of frame k's interval, so rounding cannot land on its neighbour."""
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError(SkipReason.NO_VIDEO_FRAMES, f"{path} has no video stream")
            stream = container.streams.video[0]
            start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            if stream.duration:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = (container.duration or 0) / av.time_base
            rate = float(stream.average_rate or 0)
            available = stream.frames or round(duration * rate)
    except av.FFmpegError as error:
        raise MediaError(SkipReason.CORRUPT_MEDIA, f"cannot open video {path}: {error}") from None
    if duration <= 0 or available <= 0:
        raise MediaError(SkipReason.NO_VIDEO_FRAMES, f"{path} has no decodable frames")
    fps = rate or available / duration
    return [start + (index + 0.5) / fps for index in sample_frame_indices(available, fps, config)]


@dataclass
class DecodedFrames:
    frames: list[Image.Image]
    frames_decoded: int  # how many frames the decoder produced to get them (seeking keeps this low)


def decode_frames_at(path: str, times: list[float], seek_threshold_s: float) -> DecodedFrames:
    """For each (ascending) time the frame on screen then; seeks over gaps > seek_threshold_s."""
    frames: list[Image.Image] = []
    decoded = 0
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            frame_iterator = None
            shown = None  # latest decoded frame at or before the current target
            upcoming = None  # first decoded frame after the current target
            for target in times:
                if upcoming is None or upcoming.time <= target:
                    last_seen = upcoming if upcoming is not None else shown
                    if frame_iterator is None or last_seen is None or target - last_seen.time > seek_threshold_s:
                        container.seek(int(target / stream.time_base), stream=stream, backward=True)
                        frame_iterator = container.decode(stream)
                        shown, upcoming = None, None
                    elif upcoming is not None:
                        shown, upcoming = upcoming, None
                    for frame in frame_iterator:
                        decoded += 1
                        if frame.time is None:
                            raise MediaError(SkipReason.CORRUPT_MEDIA, f"{path}: frames carry no timestamps")
                        if frame.time > target:
                            upcoming = frame
                            break
                        shown = frame
                chosen = shown if shown is not None else upcoming
                if chosen is None:
                    raise MediaError(SkipReason.NO_VIDEO_FRAMES, f"{path}: no frame decodes near {target:.2f}s")
                frames.append(chosen.to_image())
    except av.FFmpegError as error:
        raise MediaError(SkipReason.CORRUPT_MEDIA, f"cannot decode video {path}: {error}") from None
    return DecodedFrames(frames, decoded)
