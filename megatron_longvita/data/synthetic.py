"""A small synthetic multimodal corpus for the CPU quickstart and the end-to-end tests.

Images of coloured shapes with captions and questions, a few short videos of a moving
shape, and a byte-level BPE tokenizer trained on the corpus text so that its special-token
ids land where a model preset expects them (``image_token_id``): no hub download needed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import yaml
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_longvita.config.tokens import CHATML_TOKENS, PAD_TOKEN, SPECIAL_TOKENS

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = ("What is in the image?", "Describe the picture.", "What shape and colour do you see?")


@dataclass(frozen=True)
class SyntheticCorpus:
    mixture: str  # mixture YAML over the training JSONL
    tokenizer_dir: str
    test_images: list[tuple[str, str]]  # (path, expected answer) never seen in training


def draw_shape(path: str, colour: str, shape: str, size: int, rng: np.random.Generator) -> str:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    extent = int(rng.integers(size * 2 // 3, size))  # large: colour and outline dominate the few tiles
    left, top = (int(v) for v in rng.integers(0, size - extent, size=2))
    box = (left, top, left + extent, top + extent)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon(
            [(left + extent // 2, top), (left, top + extent), (left + extent, top + extent)], fill=COLOURS[colour]
        )
    image.save(path)
    return path


def draw_video(path: str, colour: str, shape: str, size: int, num_frames: int, rng: np.random.Generator) -> str:
    """A shape sliding left to right: mpeg4 at 2 fps, near-lossless."""
    with av.open(path, mode="w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(2))
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.qmin = stream.codec_context.qmax = 2
        for index in range(num_frames):
            frame_path = f"{path}.frame.png"
            draw_shape(frame_path, colour, shape, size, rng)
            frame = av.VideoFrame.from_image(Image.open(frame_path).convert("RGB"))
            frame.pts = index
            container.mux(stream.encode(frame))
            os.remove(frame_path)
        container.mux(stream.encode())
    return path


def answer(colour: str, shape: str) -> str:
    return f"A {colour} {shape}."


def train_tokenizer(texts: list[str], directory: str, image_token_id: int) -> str:
    """A byte-level BPE whose <IMG_CONTEXT> (added after the base vocabulary) gets ``image_token_id``."""
    base_vocab = image_token_id - SPECIAL_TOKENS.index("<IMG_CONTEXT>")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=base_vocab,
            special_tokens=[PAD_TOKEN, *CHATML_TOKENS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    if tokenizer.get_vocab_size() != base_vocab:
        raise ValueError(
            f"the corpus text yields {tokenizer.get_vocab_size()} BPE tokens, not {base_vocab}: "
            "add text or lower image_token_id"
        )
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    return directory


def make_corpus(
    root: str,
    image_token_id: int,
    image_size: int = 56,
    num_images: int = 240,
    num_videos: int = 8,
    num_test: int = 4,
    seed: int = 0,
) -> SyntheticCorpus:
    root = os.path.abspath(root)  # the mixture resolves relative paths against its own folder
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "media"), exist_ok=True)
    records, texts = [], []
    for index in range(num_images + num_videos):
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        question = str(rng.choice(QUESTIONS))
        if index < num_images:
            media = {"images": [f"media/img{index:04d}.png"]}
            draw_shape(os.path.join(root, media["images"][0]), colour, shape, image_size, rng)
            prompt = f"<image>\n{question}"
        else:
            media = {"videos": [f"media/vid{index:04d}.mp4"]}
            draw_video(os.path.join(root, media["videos"][0]), colour, shape, image_size, 3, rng)
            prompt = "<video>\nWhat moves in the video?"
        reply = answer(colour, shape)
        records.append(
            {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}], **media}
        )
        texts += [prompt, reply]
    test_images = []
    for index in range(num_test):
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        path = draw_shape(os.path.join(root, "media", f"unseen{index}.png"), colour, shape, image_size, rng)
        test_images.append((path, answer(colour, shape)))
    data = os.path.join(root, "train.jsonl")
    with open(data, "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
    mixture = os.path.join(root, "mixture.yaml")
    with open(mixture, "w") as handle:
        yaml.safe_dump({"dataset": {"shapes": {"ratio": 1.0, "data_paths": [data], "media_root": root}}}, handle)
    words = " ".join(list(COLOURS) + list(SHAPES) + ["A", "moves", "video", "image", "picture"])
    tokenizer_dir = train_tokenizer(
        texts + [words] * 20 + ["user assistant system\n"] * 20, os.path.join(root, "tokenizer"), image_token_id
    )
    return SyntheticCorpus(mixture, tokenizer_dir, test_images)
