"""ChatML template, the Long-VITA special tokens and placeholder expansion (docs/design.md,
"Conversation records" and "Token layout")."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import AddedToken, Tokenizer

from megatron_longvita.config.data import MediaConfig
from megatron_longvita.config.tokens import (
    CHATML_TOKENS,
    IMAGE_PLACEHOLDER,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    VIDEO_PLACEHOLDER,
)

from .media import FrameDirectoryItem, ImageItem, MediaItem, VideoFileItem
from .schema import Message

_PLACEHOLDER_PATTERN = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


class ChatTokenizer:
    """A Hugging Face ``tokenizer.json`` extended with the Long-VITA special tokens."""

    def __init__(self, tokenizer: Tokenizer, source: str = "<in memory>") -> None:
        for token in CHATML_TOKENS:
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"tokenizer {source} lacks the ChatML token {token}")
        tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
        self.tokenizer = tokenizer
        self.ids = {token: tokenizer.token_to_id(token) for token in (*CHATML_TOKENS, *SPECIAL_TOKENS)}
        pad_id = tokenizer.token_to_id(PAD_TOKEN)
        self.pad_id: int = pad_id if pad_id is not None else self.ids["<|im_end|>"]
        self.newline_ids = self.encode("\n")

    @classmethod
    def from_dir(cls, directory: str) -> ChatTokenizer:
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} is not a Hugging Face tokenizer directory (no tokenizer.json)")
        return cls(Tokenizer.from_file(path), source=directory)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def context_token_ids(self) -> tuple[int, int, int]:
        """IMG_CONTEXT, PATCH_CONTEXT, VID_CONTEXT: the positions vision embeddings replace."""
        return self.ids["<IMG_CONTEXT>"], self.ids["<PATCH_CONTEXT>"], self.ids["<VID_CONTEXT>"]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def _wrapped(tokenizer: ChatTokenizer, start: str, context: str, end: str, tokens_per_tile: int) -> list[int]:
    ids = tokenizer.ids
    return [ids[start], *([ids[context]] * tokens_per_tile), ids[end]]


def expand_media(item: MediaItem, tokenizer: ChatTokenizer, config: MediaConfig) -> list[int]:
    """The token ids that stand for one image or video, in the order its tiles are stored."""
    per_tile = config.tokens_per_tile
    if isinstance(item, (VideoFileItem, FrameDirectoryItem)):
        return _wrapped(tokenizer, "<vid>", "<VID_CONTEXT>", "</vid>", per_tile) * item.num_tiles
    thumbnail = _wrapped(tokenizer, "<img>", "<IMG_CONTEXT>", "</img>", per_tile)
    cols, rows = item.grid
    if cols * rows == 1:
        return thumbnail
    patch = _wrapped(tokenizer, "<patch>", "<PATCH_CONTEXT>", "</patch>", per_tile)
    grid = (tokenizer.newline_ids + patch * cols) * rows
    return thumbnail + grid if config.thumbnail_position == "first" else grid + thumbnail


@dataclass
class TokenizedConversation:
    ids: np.ndarray  # int64 [n]
    is_target: np.ndarray  # bool [n]: assistant content and its closing "<|im_end|>\n"
    media: list[MediaItem]  # in placeholder order, i.e. the order of their tiles


def tokenize_conversation(
    messages: Sequence[Message],
    images: Sequence[ImageItem],
    videos: Sequence[MediaItem],
    tokenizer: ChatTokenizer,
    config: MediaConfig,
    add_generation_prompt: bool = False,
) -> TokenizedConversation:
    """ChatML with placeholders expanded; ``images``/``videos`` match the placeholders in order."""
    pending = {IMAGE_PLACEHOLDER: iter(images), VIDEO_PLACEHOLDER: iter(videos)}
    segments: list[tuple[list[int], bool]] = []
    media: list[MediaItem] = []
    for message in messages:
        is_answer = message.role == "assistant"
        segments.append((tokenizer.encode(f"<|im_start|>{message.role}\n"), False))
        for piece in _PLACEHOLDER_PATTERN.split(message.content):
            if piece in pending:
                item = next(pending[piece])
                media.append(item)
                segments.append((expand_media(item, tokenizer, config), False))
            elif piece:
                segments.append((tokenizer.encode(piece), is_answer))
        segments.append((tokenizer.encode("<|im_end|>\n"), is_answer))
    if add_generation_prompt:
        segments.append((tokenizer.encode("<|im_start|>assistant\n"), False))
    ids = np.fromiter((token for part, _ in segments for token in part), dtype=np.int64)
    is_target = np.concatenate([np.full(len(part), target, dtype=bool) for part, target in segments])
    return TokenizedConversation(ids, is_target, media)
