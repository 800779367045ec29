"""HTTP request bodies -> validated requests: the OpenAI chat schema and the reference's ``PUT /api``.

Pure parsing, no model or torch: every check names the field at fault, so a client sees what
to fix (``RequestError`` becomes a 4xx). Media arrive as base64 ``data:`` URLs, or as local
paths under ``--allowed-media-root`` (none by default); remote URLs are refused, since a
server that fetches whatever a prompt names is an open proxy.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union
from urllib.parse import unquote, urlparse

from megatron_longvita.config.tokens import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

MAX_STOP_SEQUENCES = 16
REFERENCE_DEFAULT_TOKENS = 64  # the reference server's tokens_to_generate default


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with a message naming the field."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


@dataclass(frozen=True)
class MediaBytes:
    data: bytes
    suffix: str  # file name suffix for the decoder, from the MIME type (".png", ".mp4")


Media = Union[str, MediaBytes]  # a checked local path, or decoded data


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]  # role + text, media placeholders in place
    images: list[Media] = field(default_factory=list)
    videos: list[Media] = field(default_factory=list)
    max_tokens: Optional[int] = None  # None: what the context leaves
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    max_num_frames: Optional[int] = None
    stream: bool = False
    include_usage: bool = False


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _get(
    body: dict, name: str, kinds: tuple[type, ...], default: Any = None, required: bool = False, where: str = ""
) -> Any:
    """``body[name]`` if of one of ``kinds`` (bool is not an int here), else a 400 naming it."""
    path = f"{where}{name}"
    if name not in body or body[name] is None:
        if required:
            raise RequestError(400, f"'{path}' is required", path)
        return default
    value = body[name]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        expected = " or ".join("number" if k is float else k.__name__ for k in kinds)
        raise RequestError(400, f"'{path}' must be {expected}, got {_type_name(value)}", path)
    return value


def _positive_int(body: dict, name: str, default: Optional[int] = None) -> Optional[int]:
    value = _get(body, name, (int,), default)
    if value is not None and value < 1:
        raise RequestError(400, f"'{name}' must be >= 1, got {value}", name)
    return value


_SUFFIXES = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/bmp": ".bmp",
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "video/x-matroska": ".mkv",
    "video/quicktime": ".mov",
    "video/avi": ".avi",
    "video/x-msvideo": ".avi",
}


def decode_base64(data: str, param: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(400, f"'{param}' is not valid base64: {error}", param) from None


def local_media_path(path: str, media_root: Optional[str], param: str) -> str:
    """A local file or frame directory, allowed only inside ``media_root`` (symlinks resolved)."""
    if media_root is None:
        raise RequestError(
            400,
            f"'{param}': local media paths are disabled; send a base64 data: URL or start "
            f"the server with --allowed-media-root",
            param,
        )
    root = os.path.realpath(media_root)
    resolved = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))
    if os.path.commonpath([root, resolved]) != root:
        raise RequestError(403, f"'{param}': {path} is outside --allowed-media-root", param, "permission_error")
    if not os.path.exists(resolved):
        raise RequestError(400, f"'{param}': {path} does not exist", param)
    return resolved


def parse_media_url(url: str, kind: str, media_root: Optional[str], param: str) -> Media:
    """``data:<mime>;base64,...``, ``file://`` or a bare path -> Media; http(s) is refused."""
    if url.startswith("data:"):
        header, sep, data = url[5:].partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError(400, f"'{param}': a data: URL must look like data:{kind}/<type>;base64,<data>", param)
        mime = header[: -len(";base64")].lower()
        if not mime.startswith(f"{kind}/"):
            raise RequestError(400, f"'{param}': expected a {kind}/* data URL, got {mime or 'no MIME type'}", param)
        return MediaBytes(decode_base64(data, param), _SUFFIXES.get(mime, ""))
    scheme = urlparse(url).scheme
    if scheme in ("http", "https", "ftp"):
        raise RequestError(400, f"'{param}': fetching remote media is disabled; send a base64 data: URL", param)
    if scheme == "file":
        url = unquote(urlparse(url).path)
    elif scheme:
        raise RequestError(400, f"'{param}': unsupported URL scheme {scheme!r}", param)
    return local_media_path(url, media_root, param)


def _content_text(content: Any, where: str, images: list[Media], videos: list[Media], media_root: Optional[str]) -> str:
    """A message's content (a string or a list of parts) as text with media placeholders."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(
            400, f"'{where}' must be a string or a list of content parts, got {_type_name(content)}", where
        )
    text = []
    for index, part in enumerate(content):
        param = f"{where}[{index}]"
        if not isinstance(part, dict):
            raise RequestError(400, f"'{param}' must be an object, got {_type_name(part)}", param)
        kind = _get(part, "type", (str,), required=True, where=f"{param}.")
        if kind == "text":
            text.append(_get(part, "text", (str,), required=True, where=f"{param}."))
        elif kind in ("image_url", "video_url"):
            media = part.get(kind)
            if isinstance(media, dict):
                url = _get(media, "url", (str,), required=True, where=f"{param}.{kind}.")
            elif isinstance(media, str):  # some clients send the URL itself
                url = media
            else:
                raise RequestError(400, f"'{param}.{kind}' must be an object with a 'url'", f"{param}.{kind}")
            if kind == "image_url":
                images.append(parse_media_url(url, "image", media_root, f"{param}.image_url.url"))
                text.append(f"{IMAGE_PLACEHOLDER}\n")
            else:
                videos.append(parse_media_url(url, "video", media_root, f"{param}.video_url.url"))
                text.append(f"{VIDEO_PLACEHOLDER}\n")
        else:
            raise RequestError(
                400, f"'{param}.type' {kind!r} is not supported; use text, image_url or video_url", f"{param}.type"
            )
    return "".join(text)


def _stop(body: dict) -> tuple[str, ...]:
    stop = _get(body, "stop", (str, list), ())
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(
            400,
            f"'stop' must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} non-empty strings",
            "stop",
        )
    return tuple(stop)


def _sampling(body: dict) -> Sampling:
    temperature = float(_get(body, "temperature", (int, float), 1.0))
    top_p = float(_get(body, "top_p", (int, float), 1.0))
    top_k = _get(body, "top_k", (int,), 0)
    seed = _get(body, "seed", (int,))
    if temperature < 0:
        raise RequestError(400, f"'temperature' must be >= 0, got {temperature}", "temperature")
    if not 0 < top_p <= 1:
        raise RequestError(400, f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    if top_k < -1:
        raise RequestError(400, f"'top_k' must be >= 0 (or -1: no cut), got {top_k}", "top_k")
    return Sampling(temperature, max(top_k, 0), top_p, seed)


def parse_chat_request(body: Any, served_model_name: str, media_root: Optional[str]) -> ChatRequest:
    """An OpenAI ``/v1/chat/completions`` body -> ChatRequest (vLLM's extras: top_k, ignore_eos,
    video_url parts; ``max_num_frames`` per request)."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {_type_name(body)}")
    model = _get(body, "model", (str,), required=True)
    if model != served_model_name:
        raise RequestError(
            404, f"model {model!r} does not exist; this server serves {served_model_name!r}", "model", "not_found_error"
        )
    raw_messages = _get(body, "messages", (list,), required=True)
    if not raw_messages:
        raise RequestError(400, "'messages' must not be empty", "messages")
    if _get(body, "n", (int,), 1) != 1:
        raise RequestError(400, "'n' > 1 is not supported", "n")
    images: list[Media] = []
    videos: list[Media] = []
    messages = []
    for index, message in enumerate(raw_messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"'{where}' must be an object, got {_type_name(message)}", where)
        role = _get(message, "role", (str,), required=True, where=f"{where}.")
        if role not in ("system", "user", "assistant"):
            raise RequestError(
                400, f"'{where}.role' {role!r} is not supported; use system, user or assistant", f"{where}.role"
            )
        if "content" not in message:
            raise RequestError(400, f"'{where}.content' is required", f"{where}.content")
        messages.append(
            {"role": role, "content": _content_text(message["content"], f"{where}.content", images, videos, media_root)}
        )
    max_tokens = _positive_int(body, "max_completion_tokens", _positive_int(body, "max_tokens"))
    stream = _get(body, "stream", (bool,), False)
    options = _get(body, "stream_options", (dict,), {})
    include_usage = _get(options, "include_usage", (bool,), False, where="stream_options.")
    if options and not stream:
        raise RequestError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
    return ChatRequest(
        messages,
        images,
        videos,
        max_tokens,
        _sampling(body),
        _stop(body),
        _get(body, "ignore_eos", (bool,), False),
        _positive_int(body, "max_num_frames"),
        stream,
        include_usage,
    )


def parse_reference_request(body: Any, media_root: Optional[str]) -> list[ChatRequest]:
    """The reference server's ``PUT /api`` body: ``prompts`` (user texts with ``<image>`` /
    ``<video>`` tags), ``tokens_to_generate``, ``image_path_list`` | ``image_list`` (base64) |
    ``video_path_list`` shared by the prompts, ``max_num_frame``; greedy, as there."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {_type_name(body)}")
    prompts = _get(body, "prompts", (list,), required=True)
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise RequestError(400, "'prompts' must be a non-empty list of non-empty strings", "prompts")
    if len(prompts) > 128:
        raise RequestError(400, "at most 128 prompts per request", "prompts")
    tokens = _get(body, "tokens_to_generate", (int,), REFERENCE_DEFAULT_TOKENS)
    if tokens < 1:
        raise RequestError(400, f"'tokens_to_generate' must be >= 1, got {tokens}", "tokens_to_generate")
    for name in ("image_path_list", "image_list", "video_path_list"):
        values = _get(body, name, (list,), [])
        if not all(isinstance(v, str) for v in values):
            raise RequestError(400, f"'{name}' must be a list of strings", name)
    images: list[Media] = [
        local_media_path(p, media_root, f"image_path_list[{i}]")
        for i, p in enumerate(body.get("image_path_list") or [])
    ]
    images += [MediaBytes(decode_base64(s, f"image_list[{i}]"), "") for i, s in enumerate(body.get("image_list") or [])]
    videos: list[Media] = [
        local_media_path(p, media_root, f"video_path_list[{i}]")
        for i, p in enumerate(body.get("video_path_list") or [])
    ]
    frames = _positive_int(body, "max_num_frame")
    return [
        ChatRequest(
            [{"role": "user", "content": prompt}],
            list(images),
            list(videos),
            tokens,
            Sampling(temperature=0.0),
            max_num_frames=frames,
        )
        for prompt in prompts
    ]
