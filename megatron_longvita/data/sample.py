"""One sample through the two halves of the pipeline: ``prepare_sample`` (text, media
headers: cheap, gives the packed length) and ``load_sample_pixels`` (decoding: expensive)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_longvita.config.data import MediaConfig

from .media import ImageItem, MediaItem, VideoItem, plan_image, plan_video, resolve_media_path
from .schema import EmbeddedImage, Record
from .skips import BadSampleError, MediaError, SkipReason
from .template import ChatTokenizer, tokenize_conversation
from .tiling import empty_tiles


@dataclass
class PreparedSample:
    """A tokenised sample whose pixels are not decoded yet.

    Labels are shifted within the sample (Megatron convention): position t of the packed
    sample holds ``tokens[t] = ids[t]`` and ``labels[t] = ids[t + 1]``. The last id, the
    newline after the final ``<|im_end|>``, is never an input, so every target survives.
    """

    ids: np.ndarray  # int64 [n]
    is_target: np.ndarray  # bool [n]
    media: list[MediaItem]  # placeholder order
    location: str
    group: str

    def __len__(self) -> int:
        return len(self.ids) - 1

    @property
    def tokens(self) -> np.ndarray:
        return self.ids[:-1]

    @property
    def labels(self) -> np.ndarray:
        return self.ids[1:]

    @property
    def loss_mask(self) -> np.ndarray:
        return self.is_target[1:]

    @property
    def num_tiles(self) -> int:
        return sum(item.num_tiles for item in self.media)


def plan_media(record: Record, media_root: str, config: MediaConfig) -> tuple[list[ImageItem], list[VideoItem]]:
    try:
        images = [
            plan_image(path if isinstance(path, EmbeddedImage) else resolve_media_path(path, media_root), config)
            for path in record.images
        ]
        videos = [plan_video(resolve_media_path(path, media_root), config) for path in record.videos]
    except MediaError as error:
        raise BadSampleError(error.reason, record.location, str(error)) from None
    return images, videos


def prepare_sample(
    record: Record, group: str, media_root: str, tokenizer: ChatTokenizer, config: MediaConfig, seq_length: int
) -> PreparedSample:
    images, videos = plan_media(record, media_root, config)
    conversation = tokenize_conversation(record.messages, images, videos, tokenizer, config)
    sample = PreparedSample(conversation.ids, conversation.is_target, conversation.media, record.location, group)
    if len(sample) > seq_length:
        raise BadSampleError(SkipReason.TOO_LONG, record.location, f"{len(sample)} tokens > seq_length {seq_length}")
    return sample


def load_media_pixels(media: list[MediaItem], config: MediaConfig, location: str) -> torch.Tensor:
    """[sum of tiles, 3, S, S] in placeholder order; BadSampleError if any media fails to decode."""
    try:
        tiles = [item.load(config) for item in media]
    except MediaError as error:
        raise BadSampleError(error.reason, location, str(error)) from None
    return torch.cat(tiles) if tiles else empty_tiles(config)
