"""Conversation records and the files that hold them, in the layouts datasets ship in.

Record layouts: ours (Long-VITA: ``messages`` with role/content, ``images`` / ``videos`` lists)
and LLaVA's (``conversations`` with from/value, one ``image`` string or list, one ``video``).
Containers: JSON Lines, JSON arrays, and parquet shards whose image bytes are embedded
(LLaVA-OneVision, LLaVA-ReCap). RECORD_FORMATS names every (layout, container) pair; a mixture
group picks one with ``format:``, otherwise open_record_file detects it (docs/design.md,
"Record formats").
"""

from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, Union

from megatron_longvita.config.tokens import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from megatron_longvita.registry import Registry

from .skips import BadSampleError, SkipReason

ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


@dataclass(frozen=True)
class Message:
    role: str  # canonical: system | user | assistant
    content: str


@dataclass(frozen=True)
class EmbeddedImage:
    """Encoded image bytes carried inside the record file (decoded in a DataLoader worker)."""

    data: bytes
    name: str  # file:row image[k], for error messages

    def __repr__(self) -> str:  # keep logs free of raw bytes
        return f"EmbeddedImage({self.name}, {len(self.data)} bytes)"


ImageSource = Union[str, EmbeddedImage]


@dataclass(frozen=True)
class Record:
    messages: tuple[Message, ...]
    images: tuple[ImageSource, ...]  # paths, or bytes embedded in the record file
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


def parse_record(
    raw: Any, location: str, require_answer: bool = True, embedded_images: tuple[EmbeddedImage, ...] | None = None
) -> Record:
    """Validate one decoded sample in our layout; raise BadSampleError naming what is wrong.

    ``require_answer=False`` accepts an inference request (no assistant turn yet);
    ``embedded_images`` replaces the ``images`` paths (parquet rows carry the bytes).
    """
    if not isinstance(raw, dict):
        raise _invalid(location, f"a sample must be a JSON object, got {type(raw).__name__}")
    raw_messages = raw.get("messages", raw.get("conversations"))
    if not isinstance(raw_messages, list) or not raw_messages:
        raise _invalid(location, "'messages' (or 'conversations') must be a non-empty list")
    messages = tuple(_parse_message(message, location) for message in raw_messages)
    if require_answer and not any(message.role == "assistant" for message in messages):
        raise _invalid(location, "no assistant turn, so nothing to learn from")
    images = embedded_images if embedded_images is not None else _parse_paths(raw, "images", location)
    record = Record(messages, images, _parse_paths(raw, "videos", location), location)
    for placeholder, paths in ((IMAGE_PLACEHOLDER, record.images), (VIDEO_PLACEHOLDER, record.videos)):
        count = sum(message.content.count(placeholder) for message in messages)
        if count != len(paths):
            raise BadSampleError(
                SkipReason.PLACEHOLDER_MISMATCH, location, f"{count} {placeholder} placeholders but {len(paths)} paths"
            )
    return record


def llava_to_record_layout(raw: Any, location: str) -> dict:
    """A LLaVA record (``conversations`` from/value, ``image`` str or list, ``video`` str) in our layout.

    LLaVA's conventions, made explicit: a record whose text holds no ``<image>`` gets one per
    image at the start of the first user turn (LLaVA's trainer puts it there); in a video
    record ``<image>`` stands for the video (LLaVA-Video-178K), so it becomes ``<video>``.
    """
    if not isinstance(raw, dict):
        raise _invalid(location, f"a sample must be a JSON object, got {type(raw).__name__}")
    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _invalid(location, "'conversations' must be a non-empty list")
    images = raw.get("image") or []
    images = [images] if isinstance(images, str) else images
    video = raw.get("video")
    videos = [] if video is None else [video]
    if not isinstance(images, list) or (video is not None and not isinstance(video, str)):
        raise _invalid(location, "'image' must be a path or a list of paths and 'video' a path")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise _invalid(location, f"a turn must be an object, got {type(turn).__name__}")
        messages.append({"role": turn.get("from"), "content": turn.get("value")})
    texts = [message["content"] for message in messages if isinstance(message["content"], str)]
    if videos and not images:
        texts_hold_video = any(VIDEO_PLACEHOLDER in text for text in texts)
        for message in messages:
            if isinstance(message["content"], str) and not texts_hold_video:
                message["content"] = message["content"].replace(IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)
    for placeholder, media in ((IMAGE_PLACEHOLDER, images), (VIDEO_PLACEHOLDER, videos)):
        if media and not any(
            placeholder in message["content"] for message in messages if isinstance(message["content"], str)
        ):
            first_user = next((m for m in messages if ROLE_ALIASES.get(m["role"]) == "user"), None)
            if first_user is not None and isinstance(first_user["content"], str):
                first_user["content"] = f"{placeholder}\n" * len(media) + first_user["content"]
    return {"messages": messages, "images": images, "videos": videos}


def parse_llava_record(raw: Any, location: str) -> Record:
    return parse_record(llava_to_record_layout(raw, location), location)


RecordParser = Callable[[Any, str], Record]


class RecordFile(Protocol):
    path: str

    def __len__(self) -> int: ...

    def read(self, index: int) -> Record:
        """Parse sample ``index``; raise BadSampleError if it is unusable."""


RECORD_FORMATS: Registry[Callable[[str], RecordFile]] = Registry("record format")


class JsonLinesFile:
    """One sample per line, parsed lazily; only byte offsets of non-blank lines stay in memory."""

    def __init__(self, path: str, parse: RecordParser = parse_record) -> None:
        self.path = path
        self.parse = parse
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
        return self.parse(raw, location)


class JsonArrayFile:
    """A JSON array of samples; the file must parse as a whole (a broken array is a hard error)."""

    def __init__(self, path: str, parse: RecordParser = parse_record) -> None:
        self.path = path
        self.parse = parse
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
        return self.parse(self._samples[index], f"{self.path}[{index}]")


def _embedded_image(value: Any, name: str, location: str) -> EmbeddedImage:
    """One cell of a Hugging Face ``Image`` column: a struct {bytes, path}, or raw bytes."""
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise BadSampleError(SkipReason.MISSING_MEDIA, location, f"{name} carries no image bytes")
    return EmbeddedImage(bytes(data), name)


class ParquetFile:
    """A parquet shard in LLaVA layout with the images inside (LLaVA-OneVision, LLaVA-ReCap):
    ``conversations`` (from/value), ``image`` (one Image cell, may be null) or ``images`` (a list).

    Only the footer is read at open; a read decodes one row group, and the last few stay cached
    (the file is reopened in each process that reads, as DataLoader workers fork).
    """

    CACHED_ROW_GROUPS = 4

    def __init__(self, path: str) -> None:
        import pyarrow.parquet as pq

        self.path = path
        try:
            parquet = pq.ParquetFile(path)
        except Exception as error:  # pyarrow raises several types for a bad footer
            raise ValueError(f"{path}: not a readable parquet file: {error}") from None
        metadata, columns = parquet.metadata, set(parquet.schema_arrow.names)
        if "conversations" not in columns:
            raise ValueError(f"{path}: parquet records need a 'conversations' column, found {sorted(columns)}")
        self._columns = [name for name in ("conversations", "image", "images", "video") if name in columns]
        self._group_starts = [0]
        for group in range(metadata.num_row_groups):
            self._group_starts.append(self._group_starts[-1] + metadata.row_group(group).num_rows)
        self._handle: Any = None
        self._handle_pid = -1
        self._cache: OrderedDict[int, list[dict]] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None, "_handle_pid": -1, "_cache": OrderedDict()}

    def __len__(self) -> int:
        return self._group_starts[-1]

    def _row_group(self, group: int) -> list[dict]:
        import pyarrow.parquet as pq

        if self._handle is None or self._handle_pid != os.getpid():
            self._handle, self._handle_pid, self._cache = pq.ParquetFile(self.path), os.getpid(), OrderedDict()
        if group not in self._cache:
            self._cache[group] = self._handle.read_row_group(group, columns=self._columns).to_pylist()
            if len(self._cache) > self.CACHED_ROW_GROUPS:
                self._cache.popitem(last=False)
        self._cache.move_to_end(group)
        return self._cache[group]

    def read(self, index: int) -> Record:
        location = f"{self.path}:{index}"
        group = bisect.bisect_right(self._group_starts, index) - 1
        row = self._row_group(group)[index - self._group_starts[group]]
        cells = row.get("images") if row.get("images") is not None else row.get("image")
        cells = [] if cells is None else cells if isinstance(cells, list) else [cells]
        images = tuple(_embedded_image(cell, f"{location} image[{k}]", location) for k, cell in enumerate(cells))
        # stand-in names keep the placeholder rules counting images; the bytes replace them below
        stand_ins = [image.name for image in images]
        layout = llava_to_record_layout(
            {"conversations": row["conversations"], "image": stand_ins, "video": row.get("video")}, location
        )
        return parse_record(layout, location, embedded_images=images)


RECORD_FORMATS.register("jsonl")(JsonLinesFile)
RECORD_FORMATS.register("json")(JsonArrayFile)
RECORD_FORMATS.register("llava_jsonl")(lambda path: JsonLinesFile(path, parse_llava_record))
RECORD_FORMATS.register("llava_json")(lambda path: JsonArrayFile(path, parse_llava_record))
RECORD_FORMATS.register("parquet")(ParquetFile)


def _first_json_record(path: str) -> Any:
    """The first sample of a .jsonl/.json file, read only as far as needed (None if unreadable)."""
    with open(path, "rb") as handle:
        if path.lower().endswith(".jsonl"):
            for line in handle:
                if line.strip():
                    try:
                        return json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        return None
            return None
        head = handle.read(1 << 20).decode("utf-8", errors="replace").lstrip()
    if not head.startswith("["):
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(head[1:].lstrip())
    except json.JSONDecodeError:
        return None
    return value


def detect_format(path: str) -> str:
    """The RECORD_FORMATS name for a file: parquet by extension; JSON(L) by its first record
    (``messages`` or ``images``/``videos`` lists: ours; ``conversations`` with ``image``/``video``
    or from/value turns: LLaVA)."""
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if extension == "parquet":
        return "parquet"
    if extension not in ("jsonl", "json"):
        raise ValueError(f"{path}: cannot tell the record format from the extension; give the group a 'format:'")
    first = _first_json_record(path)
    is_llava = (
        isinstance(first, dict)
        and "messages" not in first
        and "images" not in first
        and "videos" not in first
        and isinstance(first.get("conversations"), list)
    )
    return f"llava_{extension}" if is_llava else extension


def open_record_file(path: str, record_format: str | None = None) -> RecordFile:
    """Open a record file with the named RECORD_FORMATS reader, or the detected one."""
    return RECORD_FORMATS.get(record_format or detect_format(path))(path)
