import dataclasses
import json
import re
from collections import Counter

import pytest
import torch

from megatron_longvita.data import (
    ChatTokenizer,
    DataConfig,
    MixtureStream,
    PackedDataLoader,
    load_mixture,
)


def make_config(corpus, tokenizer_dir, media_config, **overrides) -> DataConfig:
    settings = dict(
        mixture=corpus["mixture"],
        tokenizer=tokenizer_dir,
        seq_length=320,
        pack_buffer_size=16,
        num_workers=0,
        media=media_config,
    )
    return DataConfig(**{**settings, **overrides})


def take(loader, count: int) -> list[dict]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def segments(batch: dict, row: int, seq_length: int) -> list[tuple[int, int]]:
    """(start, end) of the segments of one row, from the flattened cu_seqlens."""
    cu = batch["cu_seqlens"].tolist()
    offset = row * seq_length
    return [(a - offset, b - offset) for a, b in zip(cu[:-1], cu[1:]) if offset <= a < offset + seq_length]


def sample_id(tokenizer: ChatTokenizer, tokens) -> str:
    context = set(tokenizer.context_token_ids)
    return re.search(r"sample (\w+)", tokenizer.decode([t for t in tokens if t not in context])).group(1)


@pytest.mark.parametrize("micro_batch_size", [1, 2])
def test_reset_micro_batch_contract(corpus, tokenizer_dir, media_config, micro_batch_size: int) -> None:
    config = make_config(corpus, tokenizer_dir, media_config, micro_batch_size=micro_batch_size)
    loader = PackedDataLoader(config)
    tokenizer, s = loader.tokenizer, config.seq_length
    newline = tokenizer.encode("\n")
    seen = []
    for batch in take(loader, 8):
        b = micro_batch_size
        assert batch["tokens"].shape == batch["labels"].shape == batch["position_ids"].shape == (b, s)
        assert batch["tokens"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.int64
        assert batch["loss_mask"].dtype == torch.float32
        assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"][-1] == b * s
        n_context = sum(int((batch["tokens"] == t).sum()) for t in tokenizer.context_token_ids)
        assert n_context == batch["pixel_values"].shape[0] * media_config.tokens_per_tile
        assert batch["pixel_values"].shape[1:] == (3, 56, 56)
        real = documents = 0
        for row in range(b):
            tokens, labels = batch["tokens"][row].tolist(), batch["labels"][row].tolist()
            mask, positions = batch["loss_mask"][row], batch["position_ids"][row]
            for start, end in segments(batch, row, s):
                assert positions[start:end].tolist() == list(range(end - start))
                if tokens[start] == tokenizer.pad_id:  # the padding tail: its own segment, no loss
                    assert end == s and mask[start:end].sum() == 0
                    continue
                real += end - start
                documents += 1
                # Shifted within the sample: nothing crosses into the next sample.
                assert labels[start : end - 1] == tokens[start + 1 : end]
                assert labels[end - 1] == newline[-1] and mask[end - 1] == 1
                ident = sample_id(tokenizer, tokens[start:end])
                answer = corpus["answers"][ident][0]
                targets = [labels[t] for t in range(start, end) if mask[t] == 1]
                assert tokenizer.decode(targets) == answer + "<|im_end|>\n"
                seen.append(ident)
        assert batch["stats"]["real_tokens"] == real
        assert batch["stats"]["samples"] == documents
    assert len(seen) > 20


def test_no_reset_positions_and_fill(corpus, tokenizer_dir, media_config) -> None:
    config = make_config(corpus, tokenizer_dir, media_config, packing="no_reset")
    loader = PackedDataLoader(config)
    batches = take(loader, 6)
    for batch in batches:
        assert batch["cu_seqlens"] is None
        assert batch["position_ids"][0].tolist() == list(range(config.seq_length))
        padding = batch["tokens"][0] == loader.tokenizer.pad_id
        assert batch["loss_mask"][0][padding].sum() == 0
    # Same samples as reset mode: only the layout differs.
    reset = take(PackedDataLoader(dataclasses.replace(config, packing="reset")), 6)
    for a, b in zip(batches, reset):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])


def test_exact_resume(corpus, tokenizer_dir, media_config) -> None:
    config = make_config(corpus, tokenizer_dir, media_config)
    reference = take(PackedDataLoader(config), 14)
    for stop in (3, 7):  # mid-window and later, crossing several windows (and a mixture epoch)
        first = PackedDataLoader(config)
        iterator = iter(first)
        for _ in range(stop):
            next(iterator)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = PackedDataLoader(config)
        resumed.load_state_dict(state)
        for expected, actual in zip(reference[stop:], take(resumed, 14 - stop)):
            for key in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "pixel_values"):
                assert torch.equal(expected[key], actual[key]), key


def test_resume_refuses_changed_settings(corpus, tokenizer_dir, media_config) -> None:
    state = PackedDataLoader(make_config(corpus, tokenizer_dir, media_config)).state_dict()
    other = PackedDataLoader(make_config(corpus, tokenizer_dir, media_config, seed=7))
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_workers_give_identical_batches(corpus, tokenizer_dir, media_config) -> None:
    config = make_config(corpus, tokenizer_dir, media_config)
    serial = take(PackedDataLoader(config), 5)
    parallel = take(PackedDataLoader(dataclasses.replace(config, num_workers=2)), 5)
    for a, b in zip(serial, parallel):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_mixture_ratios_and_determinism(corpus) -> None:
    groups = load_mixture(corpus["mixture"])
    stream = MixtureStream(groups, seed=3)
    assert stream.epoch_length == corpus["epoch_length"]
    names = [groups[stream.locate(i).group].name for i in range(stream.epoch_length)]
    assert Counter(names) == {"vqa": 40, "multi": 20, "video": 9, "text": 5}
    # Ratio 2: every multi-image record exactly twice; ratio 1.5: every video once, three twice.
    multi = Counter(stream.locate(i).record for i in range(stream.epoch_length) if names[i] == "multi")
    assert set(multi.values()) == {2} and len(multi) == 10
    video = Counter(stream.locate(i).record for i in range(stream.epoch_length) if names[i] == "video")
    assert sorted(video.values()) == [1, 1, 1, 2, 2, 2]
    same = MixtureStream(groups, seed=3)
    other = MixtureStream(groups, seed=4)
    order = [stream.locate(i) for i in range(50)]
    assert order == [same.locate(i) for i in range(50)]
    assert order != [other.locate(i) for i in range(50)]


def test_num_caps_a_group(corpus, tmp_path) -> None:
    from .factories import write_mixture

    mixture = write_mixture(
        str(tmp_path / "m.yaml"), {"vqa": {"ratio": 1.0, "num": 7, "data_paths": [corpus["root"] + "/vqa.jsonl"]}}
    )
    stream = MixtureStream(load_mixture(mixture), seed=0)
    assert stream.epoch_length == 7
    assert len({stream.locate(i).record for i in range(7)}) == 7


@pytest.mark.parametrize("dp_size", [2, 3])
def test_dp_shards_are_disjoint_and_complete(corpus, dp_size: int) -> None:
    groups = load_mixture(corpus["mixture"])
    full = MixtureStream(groups, seed=1)
    ranks = [MixtureStream(groups, seed=1, dp_rank=rank, dp_size=dp_size) for rank in range(dp_size)]
    positions = [
        {full.global_position(0) + stream.global_position(i) for i in range(stream.local_epoch_length())}
        for stream in ranks
    ]
    for a in range(dp_size):
        for b in range(a + 1, dp_size):
            assert not positions[a] & positions[b]
    assert set().union(*positions) == set(range(full.epoch_length))
    # Rank-local positions address exactly the samples the single-rank stream has there.
    for rank, stream in enumerate(ranks):
        for i in range(stream.local_epoch_length()):
            assert stream.locate(i) == full.locate(i * dp_size + rank)


def test_example_stage_mixtures_parse() -> None:
    import glob
    import os

    paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "../../../examples/configs/mixtures/*.yaml")))
    assert len(paths) == 4
    for path in paths:
        assert all(group.data_paths for group in load_mixture(path))
