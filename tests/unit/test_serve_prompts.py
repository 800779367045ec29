"""PromptBuilder: a model without Long-VITA's patch/video placeholders (an InternVL conversion)
refuses media requests with a 400 naming the tokens, and still builds text-only prompts."""

from __future__ import annotations

import base64

import pytest

from megatron_longvita.data import ChatTokenizer, MediaConfig
from megatron_longvita.serve.prompts import PromptBuilder
from megatron_longvita.serve.protocol import RequestError, parse_chat_request
from tests.references import tiny_chat_tokenizer
from tests.unit.data.factories import make_image

MISSING = ("<PATCH_CONTEXT>", "<VID_CONTEXT>")


def _request(content):
    return parse_chat_request(
        {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}, "m", None
    )


def test_media_refused_when_the_model_lacks_placeholders(tmp_path) -> None:
    builder = PromptBuilder(ChatTokenizer.from_dir(tiny_chat_tokenizer(str(tmp_path))), MediaConfig(), 4096, MISSING)
    with open(make_image(str(tmp_path / "a.png"), 40, 30), "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    image = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what"}]
    with pytest.raises(RequestError) as refused:
        builder.build(_request(image))
    assert refused.value.status == 400 and all(token in refused.value.message for token in MISSING)
    prompt, max_tokens = builder.build(_request("what is shown"))
    assert prompt.pixel_values is None and len(prompt.tokens) > 0 and max_tokens == 2
