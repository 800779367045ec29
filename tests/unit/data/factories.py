"""Generated test media and corpora: images (PIL), videos (PyAV), frame directories, JSONL and
mixture files."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from typing import Any

import av
import numpy as np
import yaml
from PIL import Image

WORDS = "what is shown in the image a cat dog sits on mat describe video frame answer question yes no red blue".split()


def make_image(path: str, width: int, height: int, seed: int = 0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def frame_color(index: int) -> tuple[int, int, int]:
    """A colour that identifies frame ``index`` < 4096 after lossy compression (16 levels per channel)."""
    return tuple(((index >> shift) % 16) * 16 + 8 for shift in (0, 4, 8))


def make_video(
    path: str, num_frames: int, fps: int = 10, size: int = 32, gop: int = 10, height: int | None = None
) -> str:
    """An mp4 whose frame i is a flat frame_color(i), size x (height or size); keyframe every ``gop`` frames."""
    height = height or size
    with av.open(path, mode="w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.width, stream.height = size, height
        stream.pix_fmt = "yuv420p"
        stream.gop_size = gop
        stream.codec_context.qmin = stream.codec_context.qmax = 2  # near-lossless: colours stay identifiable
        for index in range(num_frames):
            pixels = np.full((height, size, 3), frame_color(index), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def make_empty_video(path: str) -> str:
    """A valid container with a video stream and no frames."""
    with av.open(path, mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        container.start_encoding()  # write the header although no frame follows
    return path


def make_frame_dir(path: str, num_frames: int, size: int = 32) -> str:
    os.makedirs(path, exist_ok=True)
    for index in range(num_frames):
        pixels = np.full((size, size, 3), frame_color(index), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(path, f"frame_{index}.png"))
    return path


def write_jsonl(path: str, records: list[Any]) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def write_mixture(path: str, groups: dict[str, dict[str, Any]]) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump({"dataset": groups}, handle)
    return path


def vqa(question: str, answer: str, images: list[str] = (), videos: list[str] = ()) -> dict:
    prefix = "<image>\n" * len(images) + "<video>\n" * len(videos)
    return {
        "messages": [{"role": "user", "content": prefix + question}, {"role": "assistant", "content": answer}],
        "images": list(images),
        "videos": list(videos),
    }
