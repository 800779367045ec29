"""Fixtures for the data pipeline tests: a tiny BPE tokenizer trained here, media settings with
small tiles, and a generated mixture corpus."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_longvita.data import ChatTokenizer, MediaConfig

from .factories import WORDS, make_frame_dir, make_image, make_video, vqa, write_jsonl, write_mixture


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A byte-level BPE with the ChatML tokens, saved as a Hugging Face tokenizer directory."""
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=12)) + "\n" for _ in range(400)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(str(directory / "tokenizer.json"))
    return str(directory)


@pytest.fixture
def chat_tokenizer(tokenizer_dir: str) -> ChatTokenizer:
    return ChatTokenizer.from_dir(tokenizer_dir)


@pytest.fixture
def media_config() -> MediaConfig:
    """Small tiles (56 px, patch 14, ratio 0.5 -> 4 tokens per tile) keep tests fast."""
    return MediaConfig(image_size=56, patch_size=14, downsample_ratio=0.5, max_tiles=6, max_num_frames=8)


SIZES = [(120, 60), (60, 120), (56, 56), (200, 50), (90, 70), (30, 40), (150, 100)]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small mixture: single-image VQA (jsonl), multi-image (json array), videos (mp4 and
    frame directories), text-only; every question names its sample ("sample <id>")."""
    root = tmp_path_factory.mktemp("corpus")
    os.makedirs(root / "media")
    answers: dict[str, list[str]] = {}

    def sample(sample_id: str, answer: str, images=(), videos=()) -> dict:
        answers[sample_id] = [answer]
        return vqa(f"sample {sample_id} what is shown", answer, images, videos)

    vqa_records = []
    for index in range(40):
        width, height = SIZES[index % len(SIZES)]
        image = make_image(str(root / "media" / f"vqa{index}.png"), width, height, seed=index)
        vqa_records.append(sample(f"v{index}", " ".join(WORDS[index % 7 : index % 7 + 1 + index % 5]), [image]))
    multi_records = []
    for index in range(10):
        images = [
            make_image(str(root / "media" / f"multi{index}_{k}.png"), *SIZES[(index + k) % len(SIZES)], seed=100 + k)
            for k in range(2 + index % 2)
        ]
        relative = [os.path.relpath(path, root / "media") for path in images]  # resolved by the group's media_root
        multi_records.append(sample(f"m{index}", "a cat and a dog", relative))
    video_records = []
    for index in range(6):
        if index % 2:
            video = make_frame_dir(str(root / "media" / f"frames{index}"), 4 + index)
        else:
            video = make_video(str(root / "media" / f"video{index}.mp4"), 30 + 10 * index, fps=10, size=16)
        video_records.append(sample(f"d{index}", "the video shows a red frame", videos=[video]))
    text_records = [sample(f"t{index}", "yes " * (1 + index)) for index in range(10)]

    write_jsonl(str(root / "vqa.jsonl"), vqa_records)
    with open(root / "multi.json", "w", encoding="utf-8") as handle:
        json.dump(multi_records, handle)
    write_jsonl(str(root / "video.jsonl"), video_records)
    write_jsonl(str(root / "text.jsonl"), text_records)
    mixture = write_mixture(
        str(root / "mixture.yaml"),
        {
            "vqa": {"ratio": 1.0, "data_paths": ["vqa.jsonl"]},
            "multi": {"ratio": 2.0, "data_paths": ["multi.json"], "media_root": "media"},
            "video": {"ratio": 1.5, "data_paths": ["video.jsonl"]},
            "text": {"ratio": 0.5, "data_paths": ["text.jsonl"]},
            "unused": {"ratio": 0, "data_paths": ["does/not/exist.jsonl"]},
        },
    )
    return {"root": str(root), "mixture": mixture, "answers": answers, "epoch_length": 40 + 20 + 9 + 5}
