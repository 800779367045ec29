"""Inference prompts: messages + media -> tokens up to ``<|im_start|>assistant\\n`` and tiles."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_longvita.config.data import MediaConfig

from .sample import load_media_pixels, plan_media
from .schema import parse_record
from .template import ChatTokenizer, tokenize_conversation

REQUEST_LOCATION = "<inference request>"


@dataclass
class InferencePrompt:
    tokens: torch.Tensor  # int64 [1, n]
    pixel_values: torch.Tensor  # [n_tiles, 3, S, S], placeholder order


def build_inference_prompt(
    messages: Sequence[dict[str, Any]],
    tokenizer: ChatTokenizer,
    config: MediaConfig,
    images: Sequence[str] = (),
    videos: Sequence[str] = (),
    media_root: str = ".",
) -> InferencePrompt:
    """Same template, tiling and expansion as training; raises BadSampleError on bad input."""
    raw = {"messages": list(messages), "images": list(images), "videos": list(videos)}
    record = parse_record(raw, REQUEST_LOCATION, require_answer=False)
    planned_images, planned_videos = plan_media(record, media_root, config)
    conversation = tokenize_conversation(
        record.messages, planned_images, planned_videos, tokenizer, config, add_generation_prompt=True
    )
    return InferencePrompt(
        tokens=torch.from_numpy(conversation.ids).unsqueeze(0),
        pixel_values=load_media_pixels(conversation.media, config, REQUEST_LOCATION),
    )
