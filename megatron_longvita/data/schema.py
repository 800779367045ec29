"""Long-VITA conversation records (docs/design.md, "Conversation records") and the files that hold them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from megatron_longvita.config.tokens import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from megatron_longvita.registry import Registry

from .skips import BadSampleError, SkipReason

ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


@dataclass(frozen=True)
class Message:
    role: str  # canonical: system | user | assistant
    content: str


@dataclass(frozen=True)
class Record:
    messages: tuple[Message, ...]
    images: tuple[str, ...]
    videos: tuple[str, ...]
    location: str  # file:line, carried into every error about this sample


def _invalid(location: str, detail: str) -> BadSampleError:
    return BadSampleError(SkipReason.INVALID_SCHEMA, location, detail)


def _parse_message(raw: Any, location: str) -> Message:
    if not isinstance(raw, dict):
        raise _invalid(location, f"a message must be an object, got {type(raw).__name__}")
    role = raw.get("role", raw.get("from"))  # "from"/"value": ShareGPT spelling
    content = raw.get("content", raw.get("value"))
    if role not in ROLE_ALIASES:
        raise _invalid(location, f"unknown role {role!r}; expected one of {sorted(ROLE_ALIASES)}")
    if not isinstance(content, str):
        raise _invalid(location, f"message content must be a string, got {type(content).__name__}")
    return Message(ROLE_ALIASES[role], content)


def _parse_paths(raw: dict, key: str, location: str) -> tuple[str, ...]:
    value = raw.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(path, str) for path in value):
        raise _invalid(location, f"{key!r} must be a list of paths")
    return tuple(value)


def parse_record(raw: Any, location: str, require_answer: bool = True) -> Record:
    """Validate one decoded JSON sample; raise BadSampleError naming what is wrong.

    ``require_answer=False`` accepts an inference request (no assistant turn yet).
    """
    if not isinstance(raw, dict):
        raise _invalid(location, f"a sample must be a JSON object, got {type(raw).__name__}")
    raw_messages = raw.get("messages", raw.get("conversations"))
    if not isinstance(raw_messages, list) or not raw_messages:
        raise _invalid(location, "'messages' (or 'conversations') must be a non-empty list")
    messages = tuple(_parse_message(message, location) for message in raw_messages)
    if require_answer and not any(message.role == "assistant" for message in messages):
        raise _invalid(location, "no assistant turn, so nothing to learn from")
    record = Record(messages, _parse_paths(raw, "images", location), _parse_paths(raw, "videos", location), location)
    for placeholder, paths in ((IMAGE_PLACEHOLDER, record.images), (VIDEO_PLACEHOLDER, record.videos)):
        count = sum(message.content.count(placeholder) for message in messages)
        if count != len(paths):
            raise BadSampleError(
                SkipReason.PLACEHOLDER_MISMATCH, location, f"{count} {placeholder} placeholders but {len(paths)} paths"
            )
    return record


class RecordFile(Protocol):
    path: str

    def __len__(self) -> int: ...

    def read(self, index: int) -> Record:
        """Parse sample ``index``; raise BadSampleError if it is unusable."""


RECORD_FORMATS: Registry[Callable[[str], RecordFile]] = Registry("record format")


@RECORD_FORMATS.register("jsonl")
class JsonLinesFile:
    """One sample per line, parsed lazily; only byte offsets of non-blank lines stay in memory."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._offsets: list[int] = []
        self._line_numbers: list[int] = []
        offset = 0
        with open(path, "rb") as handle:
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    self._offsets.append(offset)
                    self._line_numbers.append(line_number)
                offset += len(line)

    def __len__(self) -> int:
        return len(self._offsets)

    def read(self, index: int) -> Record:
        location = f"{self.path}:{self._line_numbers[index]}"
        with open(self.path, "rb") as handle:
            handle.seek(self._offsets[index])
            line = handle.readline()
        try:
            raw = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadSampleError(SkipReason.MALFORMED_JSON, location, str(error)) from None
        return parse_record(raw, location)


@RECORD_FORMATS.register("json")
class JsonArrayFile:
    """A JSON array of samples; the file must parse as a whole (a broken array is a hard error)."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, encoding="utf-8") as handle:
            try:
                self._samples = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: not a valid JSON array: {error}") from None
        if not isinstance(self._samples, list):
            raise ValueError(f"{path}: expected a JSON array of samples, got {type(self._samples).__name__}")

    def __len__(self) -> int:
        return len(self._samples)

    def read(self, index: int) -> Record:
        return parse_record(self._samples[index], f"{self.path}[{index}]")


def open_record_file(path: str) -> RecordFile:
    """Open a record file with the reader registered for its extension (.jsonl or .json)."""
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    return RECORD_FORMATS.get(extension)(path)
