"""A checkpoint's Hugging Face tokenizer files: token ids by text, the Long-VITA tokens, and the
files an exported model directory carries (tokenizer, chat template, generation config).

Token ids are never derived by arithmetic: each one is looked up by its text in the
checkpoint's own ``tokenizer.json``. A released Long-VITA checkpoint ships the stock Qwen2.5
tokenizer; its 17 tokens are appended in the documented order (docs/design.md, "Checkpoint
formats"), which reproduces the ids the checkpoint was trained with.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from typing import Any, Optional

from tokenizers import AddedToken, Tokenizer

from megatron_longvita.config.tokens import CHATML_TOKENS, PAD_TOKEN

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# Copied as they are; tokenizer.json and tokenizer_config.json are rewritten (added tokens).
PASSTHROUGH_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "chat_template.jinja")
# ChatML (what Qwen2.5 and Long-VITA are trained on), for a tokenizer that ships no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TokenizerError(ValueError):
    """A tokenizer that cannot give the model the tokens it needs; names the token and the directory."""


class HFTokenizer:
    """The tokenizer files of one directory, extended in memory and written out with `save`."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise TokenizerError(
                f"{directory} has no {TOKENIZER_FILE}: token ids are resolved by their text from "
                "it (pass the tokenizer directory the model was trained with)"
            )
        self.tokenizer = Tokenizer.from_file(path)
        self.config: dict[str, Any] = self._json(TOKENIZER_CONFIG_FILE) or {}
        self.generation_config: Optional[dict[str, Any]] = self._json(GENERATION_CONFIG_FILE)

    def _json(self, name: str) -> Optional[dict[str, Any]]:
        path = os.path.join(self.directory, name)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def token_id(self, text: str) -> Optional[int]:
        return self.tokenizer.token_to_id(text)

    def require(self, text: str, vocab_size: int) -> int:
        """The id of `text`, which must exist and fit the model's vocabulary."""
        token_id = self.token_id(text)
        if token_id is None:
            raise TokenizerError(f"tokenizer {self.directory} has no token {text}")
        if token_id >= vocab_size:
            raise TokenizerError(
                f"tokenizer {self.directory}: token {text} has id {token_id}, outside the model's "
                f"vocabulary of {vocab_size}"
            )
        return token_id

    def append_special_tokens(self, tokens: Sequence[str], vocab_size: int) -> dict[str, int]:
        """Append the tokens this tokenizer lacks, in the given order; every one must fit `vocab_size`."""
        missing = [token for token in tokens if self.token_id(token) is None]
        self.tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in missing])
        return {token: self.require(token, vocab_size) for token in tokens}

    def generation_settings(self) -> dict[str, Any]:
        """The source's generation_config.json, or the ChatML stop / pad ids this tokenizer defines."""
        if self.generation_config is not None:
            return self.generation_config
        im_end, pad = self.token_id(CHATML_TOKENS[1]), self.token_id(PAD_TOKEN)
        stops = [token_id for token_id in (im_end, pad) if token_id is not None]
        settings: dict[str, Any] = {"eos_token_id": stops}
        if pad is not None:
            settings.update(bos_token_id=pad, pad_token_id=pad)
        return settings

    def save(self, directory: str) -> None:
        """tokenizer.json with every added token, tokenizer_config.json listing them (transformers 4.x
        slow tokenizers read them there) with a chat template, the passthrough files and generation_config.json."""
        os.makedirs(directory, exist_ok=True)
        self.tokenizer.save(os.path.join(directory, TOKENIZER_FILE))
        config = dict(self.config)
        decoder = dict(config.get("added_tokens_decoder", {}))
        for token_id, token in sorted(self.tokenizer.get_added_tokens_decoder().items()):
            decoder.setdefault(
                str(token_id),
                {
                    "content": token.content,
                    "lstrip": token.lstrip,
                    "normalized": token.normalized,
                    "rstrip": token.rstrip,
                    "single_word": token.single_word,
                    "special": token.special,
                },
            )
        config["added_tokens_decoder"] = decoder
        has_template = os.path.isfile(os.path.join(self.directory, "chat_template.jinja"))
        if "chat_template" not in config and not has_template:
            config["chat_template"] = CHATML_TEMPLATE
        with open(os.path.join(directory, TOKENIZER_CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        for name in PASSTHROUGH_FILES:
            source = os.path.join(self.directory, name)
            if os.path.isfile(source) and os.path.abspath(source) != os.path.abspath(os.path.join(directory, name)):
                shutil.copyfile(source, os.path.join(directory, name))
        with open(os.path.join(directory, GENERATION_CONFIG_FILE), "w") as f:
            json.dump(self.generation_settings(), f, indent=2)
