"""Inference building blocks in one process: sampling, RoPE scaling formulas, cached-shard
attention and the KV cache's slot bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_longvita.inference import KVCache, RopeScaling, Sampler, SamplingConfig
from megatron_longvita.parallel.decode import attend_cached


def test_greedy_top_k_1_and_tiny_top_p_pick_the_argmax() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for config in (
        SamplingConfig(),
        SamplingConfig(temperature=2.0, top_k=1),
        SamplingConfig(temperature=2.0, top_p=1e-6),
    ):
        assert torch.equal(Sampler(config)(logits), logits.argmax(-1))


def test_sampling_is_seeded_and_stays_in_the_top_k() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    config = SamplingConfig(temperature=1.5, top_k=5, seed=3)
    draws = torch.stack([Sampler(config)(logits) for _ in range(2)])
    assert torch.equal(draws[0], draws[1])
    sampler = Sampler(config)
    top5 = logits.topk(5).indices
    for _ in range(20):
        assert (sampler(logits)[:, None] == top5).any(-1).all()


def test_bad_sampling_settings_fail() -> None:
    with pytest.raises(ValueError, match="top-p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="factor must be > 1"):
        RopeScaling("yarn", 1.0)
    with pytest.raises(ValueError, match="one of"):
        RopeScaling("dynamic", 2.0)


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_rope_scaling_matches_transformers(kind: str) -> None:
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": kind, "factor": 4.0, "rope_theta": 1e6}
    if kind == "yarn":
        params["original_max_position_embeddings"] = 2048
    config = Qwen2Config(hidden_size=512, num_attention_heads=4, max_position_embeddings=8192, rope_parameters=params)
    expected, attention_factor = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    ours = RopeScaling(kind, 4.0, original_max_position_embeddings=params.get("original_max_position_embeddings"))
    torch.testing.assert_close(ours.inv_freq(1e6, 128, 8192), expected, rtol=1e-6, atol=0)
    assert ours.attention_factor == pytest.approx(attention_factor)


def test_ntk_keeps_the_highest_frequency_and_divides_the_lowest_by_the_factor() -> None:
    plain = 1.0 / 1e4 ** (torch.arange(0, 64, 2) / 64)
    ntk = RopeScaling("ntk", 8.0).inv_freq(1e4, 64, 4096)
    assert ntk[0] == plain[0] and ntk[-1].item() == pytest.approx(plain[-1].item() / 8.0, rel=1e-5)


@pytest.mark.parametrize("lengths", [[10, 3, 0], [6, 6, 6]], ids=["ragged", "equal"])
def test_attend_cached_rows_see_only_their_valid_slots(lengths: list[int]) -> None:
    """Against naive softmax attention over each row's first ``lengths[i]`` slots (fp32, tol 1e-5)."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 1, 8, generator=generator)
    k, v = (torch.randn(3, 2, 10, 8, generator=generator) for _ in range(2))
    for row, n in enumerate(lengths):  # slots past a row's length are never written: anything may be there
        k[row, :, n:], v[row, :, n:] = torch.nan, torch.inf
    out, lse = attend_cached(q, k, v, lengths, 0.5)
    assert out.shape == (3, 4, 1, 8) and lse.shape == (3, 4, 1)
    for row, n in enumerate(lengths):
        if n == 0:  # nothing cached for that row here
            assert (out[row] == 0).all() and (lse[row] == -math.inf).all()
            continue
        keys, values = (t[row, :, :n].repeat_interleave(2, dim=0) for t in (k, v))  # GQA: 2 query heads per group
        scores = (q[row] @ keys.transpose(-1, -2))[:, 0] * 0.5  # [heads, n]
        torch.testing.assert_close(out[row, :, 0], (scores.softmax(-1)[:, None] @ values)[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[row, :, 0], scores.logsumexp(-1), rtol=1e-5, atol=1e-5)


def test_kv_cache_appends_level_rows_at_their_common_slot() -> None:
    cache = KVCache(capacity=4, lengths=[2, 2])
    key = torch.arange(3 * 2 * 1 * 1, dtype=torch.float32).view(3, 2, 1, 1)  # [s, b, h, d]: 3 local, 2 real
    cache.store_prefill(0, key, key)
    cache.decoding, cache.appending = True, True
    cache.append(0, torch.tensor([[[[-1.0]], [[-2.0]]]]), torch.zeros(1, 2, 1, 1))
    assert cache.layers[0].key[:, 0, :3, 0].tolist() == [[0, 2, -1], [1, 3, -2]]  # the pad slot is overwritten


def test_kv_cache_prefill_append_and_capacity() -> None:
    cache = KVCache(capacity=5, lengths=[4, 2])
    key = torch.arange(4 * 2 * 1 * 1, dtype=torch.float32).view(4, 2, 1, 1)  # [s, b, h, d]
    cache.store_prefill(0, key, key)
    cache.decoding, cache.appending = True, True
    new = torch.full((1, 2, 1, 1), -1.0)
    cache.append(0, new, new)
    assert cache.attended_lengths() == [5, 3]
    cache.finish_step()
    stored = cache.layers[0].key[:, 0, :, 0]
    assert stored[0].tolist() == [0, 2, 4, 6, -1] and stored[1, :3].tolist() == [1, 3, -1]  # row 1 overwrites a pad
    with pytest.raises(ValueError, match="cache full"):
        cache.append(0, new, new)


@pytest.mark.parametrize("local_ranks, polls", [("1", True), ("4096", False)])
def test_decode_polls_gloo_only_while_ranks_have_a_core_per_thread(monkeypatch, local_ranks: str, polls: bool) -> None:
    from megatron_longvita.parallel import decode

    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
    decode._polling_pays.cache_clear()
    try:
        assert decode._polling_pays() is polls
    finally:
        decode._polling_pays.cache_clear()
