import json
import os

import pytest

from megatron_longvita.data import BadSampleError, DataConfig, PackedDataLoader, SkipReason
from megatron_longvita.data.inspect_mixture import inspect_mixture, main

from .factories import make_empty_video, make_frame_dir, make_image, vqa, write_jsonl, write_mixture


@pytest.fixture
def bad_corpus(tmp_path) -> dict:
    """One good sample first, then one sample of every bad kind, each on a known line."""
    media = tmp_path
    make_image(str(media / "good.png"), 80, 60)
    truncated = make_image(str(media / "truncated.png"), 300, 200)
    with open(truncated, "r+b") as handle:  # header intact, pixel data cut
        handle.truncate(os.path.getsize(truncated) // 3)
    with open(media / "garbage.jpg", "wb") as handle:
        handle.write(b"this is not an image")
    with open(media / "garbage.mp4", "wb") as handle:
        handle.write(b"\x00" * 64)
    make_empty_video(str(media / "empty.mp4"))
    os.makedirs(media / "no_frames")
    lines = {
        1: vqa("fine", "yes", ["good.png"]),
        2: '{"messages": [broken json',
        3: {"messages": [{"role": "user", "content": "no answer"}]},
        4: vqa("mismatch", "no", []) | {"images": ["good.png"]},
        5: vqa("missing", "no", ["absent.png"]),
        6: vqa("corrupt", "no", ["garbage.jpg"]),
        7: vqa("corrupt video", "no", videos=["garbage.mp4"]),
        8: vqa("empty video", "no", videos=["empty.mp4"]),
        9: vqa("empty frame dir", "no", videos=["no_frames"]),
        10: vqa("long " * 400, "no"),
        11: vqa("truncated", "no", ["truncated.png"]),
        12: vqa("fine video", "yes", videos=[make_frame_dir(str(media / "frames"), 3)]),
    }
    path = write_jsonl(str(tmp_path / "bad.jsonl"), [lines[i] for i in sorted(lines)])
    mixture = write_mixture(str(tmp_path / "m.yaml"), {"bad": {"ratio": 1.0, "data_paths": [path]}})
    expected = {
        SkipReason.MALFORMED_JSON: 2,
        SkipReason.INVALID_SCHEMA: 3,
        SkipReason.PLACEHOLDER_MISMATCH: 4,
        SkipReason.MISSING_MEDIA: 5,
        SkipReason.NO_VIDEO_FRAMES: (8, 9),
        SkipReason.TOO_LONG: 10,
    }
    return {"path": path, "mixture": mixture, "planning_skips": expected}


def make_config(bad_corpus, tokenizer_dir, media_config, **overrides) -> DataConfig:
    settings = dict(
        mixture=bad_corpus["mixture"], tokenizer=tokenizer_dir, seq_length=512, num_workers=0,
        pack_buffer_size=12, media=media_config,
    )  # fmt: skip
    return DataConfig(**{**settings, **overrides})


def test_every_bad_kind_is_counted_with_its_line(bad_corpus, tokenizer_dir, media_config) -> None:
    report = inspect_mixture(make_config(bad_corpus, tokenizer_dir, media_config), decode=True).as_dict()
    path = bad_corpus["path"]
    for reason, lines in bad_corpus["planning_skips"].items():
        lines = lines if isinstance(lines, tuple) else (lines,)
        assert report["skipped"][reason.value] == len(lines), reason
        assert sorted(e.split(": ")[0] for e in report["skip_examples"][reason.value]) == [f"{path}:{n}" for n in lines]
    # Undecodable image / video data, and the truncated image only caught by decoding (line 11).
    assert report["skipped"][SkipReason.CORRUPT_MEDIA.value] == 3
    assert sorted(e.split(": ")[0] for e in report["skip_examples"]["corrupt_media"]) == [
        f"{path}:{n}" for n in (11, 6, 7)
    ]  # string order
    assert report["samples_read"] == {"bad": 12}
    assert report["samples_used"] == {"bad": 2}


def test_loader_counts_decode_failures_in_batch_stats(bad_corpus, tokenizer_dir, media_config, caplog) -> None:
    loader = PackedDataLoader(make_config(bad_corpus, tokenizer_dir, media_config))
    batch = next(iter(loader))
    assert batch["stats"]["samples"] == 2  # the good image and the frame directory
    assert sum(batch["stats"]["skipped"].values()) == 10
    assert batch["stats"]["skipped"]["corrupt_media"] == 3
    n_context = sum(int((batch["tokens"] == t).sum()) for t in loader.tokenizer.context_token_ids)
    assert n_context == batch["pixel_values"].shape[0] * media_config.tokens_per_tile
    assert any(f"{bad_corpus['path']}:11" in message for message in caplog.messages)  # logged, not silent
    assert loader.state_dict()["skipped_total"] == batch["stats"]["skipped"]


def test_strict_mode_raises_with_location(bad_corpus, tokenizer_dir, media_config) -> None:
    loader = PackedDataLoader(make_config(bad_corpus, tokenizer_dir, media_config, strict=True))
    with pytest.raises(BadSampleError, match=rf"{bad_corpus['path']}:\d+: \w+: "):
        next(iter(loader))


def test_strict_mode_raises_from_workers(bad_corpus, tokenizer_dir, media_config) -> None:
    loader = PackedDataLoader(make_config(bad_corpus, tokenizer_dir, media_config, strict=True, num_workers=1))
    with pytest.raises(Exception, match=rf"{bad_corpus['path']}:\d+: \w+: "):
        next(iter(loader))


def test_inspect_cli(bad_corpus, tokenizer_dir, capsys) -> None:
    args = ["--mixture", bad_corpus["mixture"], "--tokenizer", tokenizer_dir, "--seq-length", "2048"]
    args += ["--image-size", "56", "--max-tiles", "4", "--num-workers", "0"]
    assert main(args + ["--json", "--reset"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["packing"] == "reset"
    assert report["samples_read"] == {"bad": 12} and report["packed_sequences"] == 1
    assert 0 < report["real_token_fraction"] < 1
    assert sum(report["token_length_histogram"].values()) == sum(report["samples_used"].values())
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "malformed_json" in text and "real-token fraction" in text
