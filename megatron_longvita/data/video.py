"""Video frame sampling (docs/design.md, "Video frames"): at most ``max_fps`` and ``max_num_frames`` frames,
evenly spread, decoded with seeking so a long video is not decoded frame by frame."""

from __future__ import annotations

import math
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


def sample_times(duration: float, available_frames: int, config: MediaConfig) -> list[float]:
    """Centres of ``n`` equal slices of [0, duration), n capped by fps, max frames and the video."""
    count = min(config.max_num_frames, max(1, math.floor(duration * config.max_fps)), available_frames)
    return [duration * (index + 0.5) / count for index in range(count)]


def list_frame_files(directory: str) -> list[str]:
    names = sorted(
        (name for name in os.listdir(directory) if name.lower().endswith(FRAME_EXTENSIONS)), key=natural_sort_key
    )
    return [os.path.join(directory, name) for name in names]


def sample_frame_files(directory: str, config: MediaConfig) -> list[str]:
    files = list_frame_files(directory)
    if not files:
        raise MediaError(SkipReason.NO_VIDEO_FRAMES, f"frame directory {directory} holds no frame images")
    duration = len(files) / config.frame_dir_fps
    times = sample_times(duration, len(files), config)
    return [files[min(int(time * config.frame_dir_fps), len(files) - 1)] for time in times]


def probe_video_times(path: str, config: MediaConfig) -> list[float]:
    """Absolute timestamps (seconds) of the frames to sample, from container metadata only."""
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
    return [start + time for time in sample_times(duration, available, config)]


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
