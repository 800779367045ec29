"""Records in the layouts public datasets ship in load through the normal loader and give the
token ids, labels and pixels of the same conversation written in our layout.

Layouts (from the dataset cards): ShareGPT4V / ALLaVA / LLaVA-Video-178K JSON (``id``,
``image`` or ``video``, ``conversations`` from/value; LLaVA-Video writes ``<image>`` for the
video), LLaVA JSONL, and LLaVA-OneVision / LLaVA-ReCap parquet (``id``, ``image`` as a
Hugging Face Image struct {bytes, path}, ``conversations``, ``data_source``).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from megatron_longvita.data import BadSampleError, DataConfig, PackedDataLoader, SkipReason
from megatron_longvita.data.loader import SampleSource
from megatron_longvita.data.mixture import load_mixture
from megatron_longvita.data.schema import detect_format, open_record_file
from megatron_longvita.data.skips import Skip

from .factories import make_video, write_jsonl, write_mixture

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TURNS = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))


def draw_image(width: int, height: int, seed: int, image_format: str = "JPEG") -> bytes:
    """A drawn picture (shapes on a background), encoded as a dataset would ship it."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        box = (x0, y0, x0 + int(rng.integers(8, width // 2)), y0 + int(rng.integers(8, height // 2)))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def turn(speaker: str, text: str) -> dict:
    return {"from": speaker, "value": text}


def message(role: str, text: str) -> dict:
    return {"role": role, "content": text}


def write_parquet(path: str, rows: list[dict], row_group_size: int = 3) -> str:
    schema = pa.schema([("id", pa.string()), ("image", IMAGE_STRUCT), ("conversations", TURNS),
                        ("data_source", pa.string())])  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def save(root, name: str, data: bytes) -> str:
    with open(os.path.join(root, name), "wb") as handle:
        handle.write(data)
    return name


@pytest.fixture
def shipped(tmp_path) -> dict:
    """Each layout next to the same conversations in our layout; returns {layout: (ours, theirs)}."""
    root = tmp_path
    os.makedirs(root / "coco")
    pairs = {}

    # ShareGPT4V / ALLaVA: a JSON array, one image path per record, relative to the image root.
    sharegpt4v, ours = [], []
    for index, (width, height) in enumerate([(120, 80), (64, 160), (200, 200)]):
        name = save(root / "coco", f"{index:012d}.jpg", draw_image(width, height, index))
        question, answer = f"sample s{index} what is in the picture", f"a picture number {index}"
        sharegpt4v.append(
            {
                "id": f"s{index}",
                "image": f"coco/{name}",
                "conversations": [turn("human", f"<image>\n{question}"), turn("gpt", answer)],
            }
        )
        ours.append({"messages": [message("user", f"<image>\n{question}"), message("assistant", answer)],
                     "images": [f"coco/{name}"]})  # fmt: skip
    with open(root / "sharegpt4v.json", "w", encoding="utf-8") as handle:
        json.dump(sharegpt4v, handle)
    pairs["sharegpt4v_json"] = (write_jsonl(str(root / "ours_sharegpt4v.jsonl"), ours), str(root / "sharegpt4v.json"))

    # LLaVA JSONL: image lists, a system turn, several rounds, one record with no <image> in the
    # text (LLaVA's convention puts it first in the first user turn), one text-only record.
    save(root, "a.png", draw_image(90, 60, 10, "PNG"))
    save(root, "b.png", draw_image(60, 90, 11, "PNG"))
    llava = [
        {"id": "m0", "image": ["a.png", "b.png"], "conversations": [
            turn("system", "be brief"), turn("human", "<image>\n<image>\nsample m0 compare"), turn("gpt", "left"),
            turn("human", "and the colour"), turn("gpt", "red")]},
        {"id": "m1", "image": "a.png", "conversations": [turn("human", "sample m1 describe"), turn("gpt", "a cat")]},
        {"id": "m2", "conversations": [turn("human", "sample m2 say yes"), turn("gpt", "yes")]},
    ]  # fmt: skip
    ours = [
        {"messages": [message("system", "be brief"), message("user", "<image>\n<image>\nsample m0 compare"),
                      message("assistant", "left"), message("user", "and the colour"), message("assistant", "red")],
         "images": ["a.png", "b.png"]},
        {"messages": [message("user", "<image>\nsample m1 describe"), message("assistant", "a cat")],
         "images": ["a.png"]},
        {"messages": [message("user", "sample m2 say yes"), message("assistant", "yes")]},
    ]  # fmt: skip
    pairs["llava_jsonl"] = (
        write_jsonl(str(root / "ours_llava.jsonl"), ours),
        write_jsonl(str(root / "llava.jsonl"), llava),
    )

    # LLaVA-Video-178K: a JSON array per subset, ``video`` relative to the subset folder, <image> for the video.
    os.makedirs(root / "academic_source")
    make_video(str(root / "academic_source" / "v0.mp4"), 9, fps=2, size=32, height=16)
    video = [
        {
            "id": "v0",
            "data_source": "0_30_s_academic_v0_1",
            "video": "academic_source/v0.mp4",
            "conversations": [turn("human", "<image>\nsample v0 what happens"), turn("gpt", "colours change")],
        }
    ]
    ours = [{"messages": [message("user", "<video>\nsample v0 what happens"), message("assistant", "colours change")],
             "videos": ["academic_source/v0.mp4"]}]  # fmt: skip
    with open(root / "0_30_s_academic_v0_1_oe.json", "w", encoding="utf-8") as handle:
        json.dump(video, handle)
    pairs["llava_video_178k"] = (write_jsonl(str(root / "ours_video.jsonl"), ours),
                                 str(root / "0_30_s_academic_v0_1_oe.json"))  # fmt: skip

    # LLaVA-OneVision / LLaVA-ReCap parquet with the image bytes inside, over several row groups;
    # OneVision also holds text-only rows (image null).
    rows, ours = [], []
    for index in range(7):
        text_only = index == 4
        data = None if text_only else draw_image(100 + 20 * index, 70 + 30 * (index % 3), 20 + index)
        question, answer = f"sample p{index} read the chart", f"value {index}"
        prefix = "" if text_only else "<image>\n"
        rows.append(
            {
                "id": f"p{index}",
                "data_source": "chartqa",
                "image": None if text_only else {"bytes": data, "path": f"p{index}.jpg"},
                "conversations": [turn("human", prefix + question), turn("gpt", answer)],
            }
        )
        record = {"messages": [message("user", prefix + question), message("assistant", answer)]}
        if not text_only:
            record["images"] = [save(root, f"p{index}.jpg", data)]
        ours.append(record)  # fmt: skip
    pairs["onevision_parquet"] = (write_jsonl(str(root / "ours_parquet.jsonl"), ours),
                                  write_parquet(str(root / "onevision.parquet"), rows))  # fmt: skip
    return {"root": str(root), "pairs": pairs}


def loader_for(root: str, path: str, tokenizer_dir: str, media_config, record_format: str | None = None,
               **overrides) -> PackedDataLoader:  # fmt: skip
    group = {"ratio": 1.0, "data_paths": [path], "media_root": root}
    if record_format:
        group["format"] = record_format
    name = os.path.basename(path).replace(".", "_")
    mixture = write_mixture(os.path.join(root, f"mixture_{name}_{record_format}.yaml"), {"g": group})
    settings = dict(mixture=mixture, tokenizer=tokenizer_dir, seq_length=1024, pack_buffer_size=16,
                    num_workers=0, media=media_config)  # fmt: skip
    return PackedDataLoader(DataConfig(**{**settings, **overrides}))


@pytest.mark.parametrize("layout", ["sharegpt4v_json", "llava_jsonl", "llava_video_178k", "onevision_parquet"])
def test_shipped_layouts_give_our_tokens_labels_and_pixels(shipped, tokenizer_dir, media_config, layout) -> None:
    ours_path, theirs_path = shipped["pairs"][layout]
    ours = loader_for(shipped["root"], ours_path, tokenizer_dir, media_config)
    theirs = loader_for(shipped["root"], theirs_path, tokenizer_dir, media_config)
    (_, ours_items), (_, their_items) = next(ours.prepared_windows(0)), next(theirs.prepared_windows(0))
    assert not any(isinstance(item, Skip) for item in ours_items + their_items)
    for mine, other in zip(ours_items, their_items):
        np.testing.assert_array_equal(other.ids, mine.ids)
        np.testing.assert_array_equal(other.is_target, mine.is_target)
        assert other.num_tiles == mine.num_tiles
    assert sum(item.num_tiles for item in their_items) > 0 or layout == "llava_jsonl"
    for mine, other in zip(iter(ours), iter(theirs)):
        for key in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "pixel_values"):
            torch.testing.assert_close(other[key], mine[key], rtol=0, atol=0)
        break


def test_formats_are_detected_and_selectable(shipped, tokenizer_dir, media_config) -> None:
    pairs = shipped["pairs"]
    assert detect_format(pairs["sharegpt4v_json"][1]) == "llava_json"
    assert detect_format(pairs["llava_jsonl"][1]) == "llava_jsonl"
    assert detect_format(pairs["llava_jsonl"][0]) == "jsonl"
    assert detect_format(pairs["onevision_parquet"][1]) == "parquet"
    # format: in the mixture overrides detection (here: the same reader, named)
    loader = loader_for(shipped["root"], pairs["llava_jsonl"][1], tokenizer_dir, media_config, "llava_jsonl")
    assert len(next(loader.prepared_windows(0))[1]) == 16
    groups = load_mixture(write_mixture(os.path.join(shipped["root"], "bad_format.yaml"),
                                        {"g": {"data_paths": ["x.jsonl"]}}))  # fmt: skip
    assert groups[0].format is None
    with pytest.raises(ValueError, match="format 'webdataset'"):
        load_mixture(write_mixture(os.path.join(shipped["root"], "unknown.yaml"),
                                   {"g": {"data_paths": ["x.jsonl"], "format": "webdataset"}}))  # fmt: skip


def test_parquet_workers_decode_the_same_batches(shipped, tokenizer_dir, media_config) -> None:
    """The parquet reader reopens its file in each worker process and gives the same micro-batches."""
    path = shipped["pairs"]["onevision_parquet"][1]
    batches = []
    for workers in (0, 2):
        loader = loader_for(shipped["root"], path, tokenizer_dir, media_config, num_workers=workers)
        iterator = iter(loader)
        batches.append([next(iterator) for _ in range(2)])
    for single, multi in zip(*batches):
        torch.testing.assert_close(multi["tokens"], single["tokens"], rtol=0, atol=0)
        torch.testing.assert_close(multi["pixel_values"], single["pixel_values"], rtol=0, atol=0)


def test_bad_parquet_and_llava_rows_are_counted_skips_with_file_and_row(tmp_path, tokenizer_dir, media_config):
    good = draw_image(80, 60, 0)
    truncated = draw_image(300, 200, 1, "PNG")
    rows = [
        {"id": "0", "data_source": "x", "image": {"bytes": good, "path": None},
         "conversations": [turn("human", "<image>\nfine"), turn("gpt", "yes")]},
        {"id": "1", "data_source": "x", "image": {"bytes": None, "path": "lost.jpg"},
         "conversations": [turn("human", "<image>\nmissing bytes"), turn("gpt", "no")]},
        {"id": "2", "data_source": "x", "image": {"bytes": b"not an image at all", "path": None},
         "conversations": [turn("human", "<image>\nundecodable"), turn("gpt", "no")]},
        {"id": "3", "data_source": "x", "image": {"bytes": good, "path": None},
         "conversations": [turn("robot", "<image>\nunknown role"), turn("gpt", "no")]},
        {"id": "4", "data_source": "x", "image": {"bytes": truncated[: len(truncated) // 3], "path": None},
         "conversations": [turn("human", "<image>\ntruncated"), turn("gpt", "no")]},
        {"id": "5", "data_source": "x", "image": None,
         "conversations": [turn("human", "<image>\nplaceholder but no image"), turn("gpt", "no")]},
    ]  # fmt: skip
    parquet_path = write_parquet(str(tmp_path / "bad.parquet"), rows, row_group_size=2)
    llava_path = write_jsonl(str(tmp_path / "bad_llava.jsonl"), [
        {"id": "0", "conversations": [turn("human", "fine"), turn("gpt", "yes")]},
        {"id": "1", "conversations": [turn("narrator", "who"), turn("gpt", "no")]},
        {"id": "2", "image": 7, "conversations": [turn("human", "<image>\nbad image key"), turn("gpt", "no")]},
    ])  # fmt: skip

    record_file = open_record_file(parquet_path)
    source_skips = {}
    for index in range(len(record_file)):
        try:
            record_file.read(index)
        except Exception as error:  # noqa: BLE001 - what matters is which rows fail here and how
            source_skips[index] = error
    assert set(source_skips) == {1, 3, 5}
    assert source_skips[1].reason == SkipReason.MISSING_MEDIA and source_skips[1].location == f"{parquet_path}:1"
    assert source_skips[3].reason == SkipReason.INVALID_SCHEMA and "robot" in str(source_skips[3])
    assert source_skips[5].reason == SkipReason.PLACEHOLDER_MISMATCH

    loader = loader_for(str(tmp_path), parquet_path, tokenizer_dir, media_config, pack_buffer_size=6)
    source = SampleSource(loader.stream, loader.tokenizer, loader.config)
    skips = {}
    for position in range(6):
        item = source[position]
        if isinstance(item, Skip):
            skips[item.location] = item.reason
    # the undecodable bytes fail at the header, the truncated ones only when decoded (counted per batch)
    assert skips == {
        f"{parquet_path}:1": SkipReason.MISSING_MEDIA, f"{parquet_path}:2": SkipReason.CORRUPT_MEDIA,
        f"{parquet_path}:3": SkipReason.INVALID_SCHEMA, f"{parquet_path}:5": SkipReason.PLACEHOLDER_MISMATCH,
    }  # fmt: skip
    first = next(iter(loader))
    assert first["stats"]["skipped"] == {"missing_media": 1, "corrupt_media": 2, "invalid_schema": 1,
                                         "placeholder_mismatch": 1}  # fmt: skip
    assert first["stats"]["samples"] == 1

    llava = loader_for(str(tmp_path), llava_path, tokenizer_dir, media_config, pack_buffer_size=3)
    llava_source = SampleSource(llava.stream, llava.tokenizer, llava.config)
    llava_skips = sorted((item.location, item.reason) for item in (llava_source[i] for i in range(3))
                         if isinstance(item, Skip))  # fmt: skip
    assert llava_skips == [
        (f"{llava_path}:2", SkipReason.INVALID_SCHEMA), (f"{llava_path}:3", SkipReason.INVALID_SCHEMA)
    ]  # fmt: skip
    with pytest.raises(BadSampleError, match=r"bad\.parquet:[1235]: "):
        next(iter(loader_for(str(tmp_path), parquet_path, tokenizer_dir, media_config, pack_buffer_size=6,
                             strict=True)))  # fmt: skip


def test_data_path_globs_expand_to_sorted_shards(shipped, tokenizer_dir, media_config) -> None:
    from megatron_longvita.data.mixture import MixtureStream, expand_data_paths

    root = shipped["root"]
    source = shipped["pairs"]["onevision_parquet"][1]
    for index in (10, 2):  # written out of order
        os.link(source, os.path.join(root, f"shard-{index:05d}.parquet"))
    mixture = write_mixture(os.path.join(root, "glob.yaml"), {"g": {"data_paths": ["shard-*.parquet"]}})
    stream = MixtureStream(load_mixture(mixture), seed=0)
    assert [os.path.basename(f.path) for f in stream.files[0]] == ["shard-00002.parquet", "shard-00010.parquet"]
    assert stream.epoch_length == 14
    unmatched = load_mixture(write_mixture(os.path.join(root, "none.yaml"), {"g": {"data_paths": ["nope-*.parquet"]}}))
    with pytest.raises(ValueError, match="nope-\\*.parquet matches no file"):
        expand_data_paths(unmatched[0])
