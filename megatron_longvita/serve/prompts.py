"""Validated requests -> engine prompts: chat template, media decoding and tiling (the
training pipeline's, as the generate CLI uses it), and the context limit.

Runs on rank 0 in the HTTP server's worker threads, so decoding a video never stalls the
engine, and a bad image is a 400 before anything reaches the ranks.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from typing import Optional

from megatron_longvita.data import ChatTokenizer, MediaConfig
from megatron_longvita.data.prompt import build_inference_prompt
from megatron_longvita.data.skips import BadSampleError
from megatron_longvita.inference import GenerationRequest
from megatron_longvita.serve.protocol import ChatRequest, Media, MediaBytes, RequestError


class PromptBuilder:
    def __init__(
        self,
        tokenizer: ChatTokenizer,
        media: MediaConfig,
        max_model_len: int,
        missing_media_tokens: tuple[str, ...] = (),
    ) -> None:
        """``missing_media_tokens``: the context placeholders the model lacks (an InternVL conversion
        puts every tile and frame on <IMG_CONTEXT>); requests with media are then refused."""
        self.tokenizer, self.media, self.max_model_len = tokenizer, media, max_model_len
        self.missing_media_tokens = missing_media_tokens

    def build(self, request: ChatRequest) -> tuple[GenerationRequest, int]:
        """(prompt, max new tokens); RequestError for undecodable media or too long a request."""
        if (request.images or request.videos) and self.missing_media_tokens:
            raise RequestError(
                400,
                f"this model defines no {', '.join(self.missing_media_tokens)}, which the Long-VITA media "
                "layout needs: it serves text-only requests",
                "messages",
            )
        media = (
            self.media if request.max_num_frames is None else replace(self.media, max_num_frames=request.max_num_frames)
        )
        with tempfile.TemporaryDirectory(prefix="longvita-request-") as scratch:
            labels: dict[str, str] = {}  # scratch file -> what the client sent, for error messages

            def materialise(items: list[Media], kind: str) -> list[str]:
                paths = []
                for index, item in enumerate(items):
                    if isinstance(item, MediaBytes):
                        path = os.path.join(scratch, f"{kind}{index}{item.suffix}")
                        with open(path, "wb") as f:
                            f.write(item.data)
                        labels[path] = f"{kind} #{index + 1}"
                        item = path
                    paths.append(item)
                return paths

            images, videos = materialise(request.images, "image"), materialise(request.videos, "video")
            try:
                built = build_inference_prompt(request.messages, self.tokenizer, media, images=images, videos=videos)
            except BadSampleError as error:
                detail = error.detail
                for path, label in labels.items():
                    detail = detail.replace(path, label)
                raise RequestError(400, f"{error.reason.value}: {detail}") from None
        tokens = built.tokens[0].tolist()
        room = self.max_model_len - len(tokens)
        max_tokens = request.max_tokens if request.max_tokens is not None else room
        if max_tokens > room or room < 1:
            raise RequestError(
                400,
                f"this model's maximum context length is {self.max_model_len} tokens; the "
                f"request has {len(tokens)} prompt tokens (media included) and asks for "
                f"{max_tokens} new tokens",
                "max_tokens" if room >= 1 else "messages",
            )
        pixel_values = built.pixel_values if len(built.pixel_values) else None
        return GenerationRequest(tokens, pixel_values), max_tokens


def default_max_model_len(model_max_positions: int, override: Optional[int]) -> int:
    if override is not None and override > model_max_positions:
        raise ValueError(
            f"--max-model-len {override} exceeds the checkpoint's max_position_embeddings "
            f"{model_max_positions} (use --rope-scaling to extend it)"
        )
    return override or model_max_positions
