"""tools/prepare_data.py on fixtures in the sources' own layouts: what it writes loads through the
normal loader, gives the tokens of the same conversation written by hand, and every record it
could not convert is counted by reason."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_longvita.data import DataConfig, PackedDataLoader
from megatron_longvita.data.skips import Skip
from tools.prepare_data import main as prepare

from .factories import make_video, write_jsonl, write_mixture
from .test_formats import IMAGE_STRUCT, draw_image, turn

DOCMATIX_SCHEMA = pa.schema([
    ("images", pa.list_(IMAGE_STRUCT)),
    ("texts", pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())]))),
])  # fmt: skip


def prepared_samples(mixture: str, tokenizer_dir: str, media_config) -> list:
    config = DataConfig(mixture=mixture, tokenizer=tokenizer_dir, seq_length=4096, pack_buffer_size=64,
                        num_workers=0, media=media_config, seed=0)  # fmt: skip
    loader = PackedDataLoader(config)
    items = next(loader.prepared_windows(0))[1][: loader.stream.epoch_length]
    assert not [item for item in items if isinstance(item, Skip)]
    return items


def test_docmatix_documents(tmp_path, tokenizer_dir, media_config) -> None:
    page_a, page_b = draw_image(120, 160, 1, "PNG"), draw_image(160, 120, 2)
    rows = [
        {"images": [{"bytes": page_a, "path": None}, {"bytes": page_b, "path": None}],
         "texts": [{"user": "sample d0 what is the total", "assistant": "42", "source": "PDFA key: 1"},
                   {"user": "and the date", "assistant": "today", "source": "PDFA key: 1"}]},
        {"images": [{"bytes": None, "path": "x.png"}], "texts": [{"user": "q", "assistant": "a", "source": "s"}]},
        {"images": [{"bytes": b"garbage", "path": None}], "texts": [{"user": "q", "assistant": "a", "source": "s"}]},
        {"images": [{"bytes": page_a, "path": None}], "texts": []},
    ]  # fmt: skip
    os.makedirs(tmp_path / "docmatix" / "data")
    shard = tmp_path / "docmatix" / "data" / "train-0.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=DOCMATIX_SCHEMA), shard)
    summary = prepare(["docmatix", str(tmp_path / "docmatix"), str(tmp_path / "out"), "--tokenizer", tokenizer_dir,
                       "--max-tiles", str(media_config.max_tiles), "--image-size", "56"])  # fmt: skip
    assert summary["written"] == {"docmatix": 1}
    assert summary["not_converted"] == {"missing_image_bytes": 1, "undecodable_image": 1, "no_turns": 1}
    converted = prepared_samples(str(tmp_path / "out" / "mixture.yaml"), tokenizer_dir, media_config)

    # the same document written by hand in our layout, over the same image bytes
    for name, data in (("a.png", page_a), ("b.jpg", page_b)):
        (tmp_path / name).write_bytes(data)
    by_hand = write_jsonl(str(tmp_path / "ours.jsonl"), [{
        "messages": [{"role": "user", "content": "<image>\n<image>\nsample d0 what is the total"},
                     {"role": "assistant", "content": "42"}, {"role": "user", "content": "and the date"},
                     {"role": "assistant", "content": "today"}],
        "images": ["a.png", "b.jpg"]}])  # fmt: skip
    expected = prepared_samples(write_mixture(str(tmp_path / "ours.yaml"), {"g": {"data_paths": [by_hand]}}),
                                tokenizer_dir, media_config)  # fmt: skip
    np.testing.assert_array_equal(converted[0].ids, expected[0].ids)
    np.testing.assert_array_equal(converted[0].is_target, expected[0].is_target)
    assert summary["tokens"] == {"docmatix": len(expected[0])}
    assert summary["tiles"] == {"docmatix": expected[0].num_tiles}


def test_llava_video_178k_subsets(tmp_path, tokenizer_dir, media_config) -> None:
    root = tmp_path / "LLaVA-Video-178K"
    for subset, clips in (("0_30_s_academic_v0_1", 2), ("30_60_s_youtube_v0_1", 1)):
        os.makedirs(root / subset / "academic_source")
        records = []
        for index in range(clips):
            name = f"academic_source/clip{index}.mp4"
            make_video(str(root / subset / name), 6 + 3 * index, fps=2)
            records.append(
                {
                    "id": f"{subset}-{index}",
                    "data_source": subset,
                    "video": name,
                    "conversations": [
                        turn("human", f"<image>\nsample {index} what happens"),
                        turn("gpt", "it changes colour"),
                    ],
                }
            )
        records.append(
            {
                "id": "gone",
                "video": "academic_source/missing.mp4",
                "conversations": [turn("human", "<image>\nq"), turn("gpt", "a")],
            }
        )
        records.append({"id": "bad", "video": "academic_source/clip0.mp4",
                        "conversations": [turn("alien", "<image>\nq"), turn("gpt", "a")]})  # fmt: skip
        (root / subset / f"{subset}_oe_processed.json").write_text(json.dumps(records))
    summary = prepare(["llava_video_178k", str(root), str(tmp_path / "out"), "--tokenizer", tokenizer_dir,
                       "--max-num-frames", str(media_config.max_num_frames), "--shard-size", "1",
                       "--image-size", "56"])  # fmt: skip
    assert summary["written"] == {"0_30_s_academic_v0_1": 2, "30_60_s_youtube_v0_1": 1}
    assert summary["not_converted"] == {"missing_video": 2, "invalid_schema": 2}
    assert len(summary["shards"]["0_30_s_academic_v0_1"]) == 2
    items = prepared_samples(str(tmp_path / "out" / "mixture.yaml"), tokenizer_dir, media_config)
    assert sorted(item.num_tiles for item in items) == [3, 3, 5]  # ceil(3 s), ceil(3 s), ceil(4.5 s) at 1 fps
    assert sum(len(item) for item in items) == sum(summary["tokens"].values())


def test_long_text_layouts(tmp_path, tokenizer_dir, media_config) -> None:
    source = write_jsonl(str(tmp_path / "long.jsonl"), [
        {"instruction": "sample a summarise", "input": "the cat sat " * 50, "output": "a cat sat"},
        {"conversations": [turn("human", "sample b hello"), turn("gpt", "yes")]},
        {"text": "plain text, no conversation"},
        '{"broken',
    ])  # fmt: skip
    summary = prepare(["long_text", source, str(tmp_path / "out"), "--tokenizer", tokenizer_dir, "--image-size", "56"])
    assert summary["written"] == {"long_text": 2}
    assert summary["not_converted"] == {"unknown_layout": 1, "malformed_json": 1}
    items = prepared_samples(str(tmp_path / "out" / "mixture.yaml"), tokenizer_dir, media_config)
    assert sum(len(item) for item in items) == summary["tokens"]["long_text"]
    with open(tmp_path / "out" / summary["shards"]["long_text"][0], encoding="utf-8") as handle:
        first = json.loads(handle.readline())
    assert first["messages"][0]["content"] == "sample a summarise\n" + "the cat sat " * 50


def test_a_source_without_annotations_is_refused(tmp_path) -> None:
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit, match="no <subset>/"):
        prepare(["llava_video_178k", str(tmp_path / "empty"), str(tmp_path / "out")])
