import os

import numpy as np
import pytest
from tokenizers import Tokenizer

from megatron_longvita.data import SPECIAL_TOKENS, ChatTokenizer, MediaConfig, build_inference_prompt, parse_record
from megatron_longvita.data.media import FrameDirectoryItem, ImageItem
from megatron_longvita.data.sample import prepare_sample
from megatron_longvita.data.template import expand_media, tokenize_conversation

from .factories import make_frame_dir, make_image, vqa


def test_special_tokens_appended_in_spec_order(tokenizer_dir: str, chat_tokenizer: ChatTokenizer) -> None:
    base_size = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json")).get_vocab_size()
    assert len(SPECIAL_TOKENS) == 17
    assert [chat_tokenizer.ids[token] for token in SPECIAL_TOKENS] == list(range(base_size, base_size + 17))
    assert chat_tokenizer.vocab_size == base_size + 17


def count(ids, token_id) -> int:
    return int(np.count_nonzero(np.asarray(ids) == token_id))


@pytest.mark.parametrize("grid", [(1, 1), (2, 1), (3, 2)])
@pytest.mark.parametrize("position", ["first", "last"])
def test_image_expansion(chat_tokenizer: ChatTokenizer, grid, position) -> None:
    config = MediaConfig(image_size=56, max_tiles=6, thumbnail_position=position)
    ids = expand_media(ImageItem("x.png", grid), chat_tokenizer, config)
    per_tile, cols, rows = config.tokens_per_tile, *grid
    tok = chat_tokenizer.ids
    thumbnail = [tok["<img>"]] + [tok["<IMG_CONTEXT>"]] * per_tile + [tok["</img>"]]
    if cols * rows == 1:
        assert ids == thumbnail
        return
    patch = [tok["<patch>"]] + [tok["<PATCH_CONTEXT>"]] * per_tile + [tok["</patch>"]]
    grid_ids = []
    for _ in range(rows):
        grid_ids += chat_tokenizer.encode("\n") + patch * cols
    assert ids == (thumbnail + grid_ids if position == "first" else grid_ids + thumbnail)
    assert count(ids, tok["<PATCH_CONTEXT>"]) == cols * rows * per_tile
    assert count(ids, tok["<IMG_CONTEXT>"]) == per_tile


def test_video_expansion(chat_tokenizer: ChatTokenizer) -> None:
    config = MediaConfig(image_size=56)
    ids = expand_media(FrameDirectoryItem(("a", "b", "c")), chat_tokenizer, config)
    tok = chat_tokenizer.ids
    assert ids == ([tok["<vid>"]] + [tok["<VID_CONTEXT>"]] * 4 + [tok["</vid>"]]) * 3


def test_labels_masked_to_assistant_turns(chat_tokenizer: ChatTokenizer, media_config: MediaConfig, tmp_path) -> None:
    raw = {
        "conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "<image>\nwhat is shown"},
            {"from": "gpt", "value": "a cat"},
            {"from": "human", "value": "and the mat"},
            {"from": "gpt", "value": "red"},
        ],
        "images": [make_image(str(tmp_path / "a.png"), 120, 60)],
    }
    record = parse_record(raw, "test:1")
    sample = prepare_sample(record, "g", str(tmp_path), chat_tokenizer, media_config, seq_length=4096)
    # Shifted within the sample: tokens[t] predicts labels[t] = tokens[t + 1].
    np.testing.assert_array_equal(sample.labels[:-1], sample.tokens[1:])
    assert len(sample) == len(sample.ids) - 1
    # Targets are exactly the assistant answers with their closing "<|im_end|>\n" (independent check by text).
    assert chat_tokenizer.decode(sample.labels[sample.loss_mask]) == "a cat<|im_end|>\nred<|im_end|>\n"
    expected_targets = sum(len(chat_tokenizer.encode(text + "<|im_end|>\n")) for text in ("a cat", "red"))
    assert int(sample.loss_mask.sum()) == expected_targets
    # The text without the image expansion is the ChatML rendering.
    context = set(chat_tokenizer.context_token_ids)
    n_context = sum(int(token in context) for token in sample.ids)
    assert n_context == sample.num_tiles * media_config.tokens_per_tile
    assert sample.num_tiles == 3  # 2:1 grid + thumbnail
    text = chat_tokenizer.decode([t for t in sample.ids if t not in context])
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n<img></img>\n<patch></patch>")
    assert text.endswith("<|im_start|>assistant\nred<|im_end|>\n")


def test_inference_prompt(chat_tokenizer: ChatTokenizer, media_config: MediaConfig, tmp_path) -> None:
    image = make_image(str(tmp_path / "a.png"), 200, 60)
    frames = make_frame_dir(str(tmp_path / "frames"), 5)
    messages = [{"role": "user", "content": "<image>\n<video>\ndescribe"}]
    prompt = build_inference_prompt(messages, chat_tokenizer, media_config, images=[image], videos=[frames])
    tokens = prompt.tokens[0].tolist()
    assert prompt.tokens.shape[0] == 1
    assert tokens[-len(chat_tokenizer.encode("<|im_start|>assistant\n")) :] == chat_tokenizer.encode(
        "<|im_start|>assistant\n"
    )
    n_context = sum(tokens.count(t) for t in chat_tokenizer.context_token_ids)
    assert prompt.pixel_values.shape[1:] == (3, 56, 56)
    assert n_context == prompt.pixel_values.shape[0] * media_config.tokens_per_tile
    assert tokens.count(chat_tokenizer.ids["<vid>"]) == 5


def test_tokenize_without_media(chat_tokenizer: ChatTokenizer, media_config: MediaConfig) -> None:
    record = parse_record(vqa("what is shown", "a dog"), "t:1")
    conversation = tokenize_conversation(record.messages, [], [], chat_tokenizer, media_config)
    assert chat_tokenizer.decode(conversation.ids) == (
        "<|im_start|>user\nwhat is shown<|im_end|>\n<|im_start|>assistant\na dog<|im_end|>\n"
    )
