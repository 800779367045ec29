"""The context-parallel inference engine against transformers on a converted tiny InternVL.

Greedy tokens (8 steps) and first-position logits (1e-4) match transformers for an image
prompt of 24 tokens (an exact multiple of 2 x CP for CP = 2 and 4: no padding, the
next-token position is a chunk's last) and a text-only prompt of 14 (padded), with cached
decoding and the fixed-length re-prefill, at CP = 1, 2, 4, TP = 2 and TP2 x CP2, alone and
batched. Also: seeded sampling is the same at every CP size, stop tokens, RoPE scaling
(linear, YaRN) against transformers' rope_parameters, and the CLI with the chat template,
an image and a video, streaming.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch

from megatron_longvita.config.parallel import ParallelConfig
from megatron_longvita.platform import initialize_distributed
from tests.harness import run_distributed
from tests.references import STEPS, TOLERANCE, comparable_tokens, prompts, tiny_chat_tokenizer, transformers_greedy

SAMPLING = dict(temperature=0.9, top_k=40, top_p=0.95, seed=7)


def engine_prompts():
    from megatron_longvita.inference import GenerationRequest

    return {
        name: GenerationRequest(ids, None if pixels is None else torch.from_numpy(pixels))
        for name, (ids, pixels) in prompts().items()
    }


def engine_results(load_dir: str, layouts: list[ParallelConfig], rope=None) -> list[dict]:
    """Per layout: {(mode, prompt name): (first logits, tokens)}, the batch of both prompts
    under ("batch", mode, name), and seeded samples under ("sampled", name)."""
    from megatron_longvita.inference import GenerationConfig, SamplingConfig, load_engine

    per_layout = []
    for parallel in layouts:
        initialize_distributed(parallel)
        engine = load_engine(load_dir, parallel, rope)
        requests = engine_prompts()
        results = {}
        for mode in ("cached", "fixed-length"):
            config = GenerationConfig(max_new_tokens=STEPS, decode_mode=mode)
            for name, prompt in requests.items():
                [generation] = engine.generate([prompt], config)
                results[(mode, name)] = (generation.first_logits, generation.tokens)
            if rope is None:
                batch = engine.generate(list(requests.values()), config)
                results.update({("batch", mode, name): (g.first_logits, g.tokens) for name, g in zip(requests, batch)})
        if rope is None:
            sampled = GenerationConfig(max_new_tokens=STEPS, sampling=SamplingConfig(**SAMPLING))
            results.update(
                {("sampled", name): (None, engine.generate([p], sampled)[0].tokens) for name, p in requests.items()}
            )
        per_layout.append(results)
    return per_layout


def _assert_matches(reference: dict, results: dict, layout: str) -> None:
    for key, (logits, tokens) in results.items():
        if key[0] == "sampled":
            continue
        expected_logits, expected_tokens = reference[key[-1]]
        expected_tokens = comparable_tokens(expected_tokens)
        tokens = tokens[: len(expected_tokens)]
        error = (logits - expected_logits).abs().max().item()
        assert error <= TOLERANCE, f"{layout} {key}: first-position logits differ by {error:.2e}"
        assert tokens == expected_tokens, f"{layout} {key}: greedy tokens {tokens} != {expected_tokens}"


def _sampled(results: dict) -> dict:
    return {key: tokens for key, (_, tokens) in results.items() if key[0] == "sampled"}


@pytest.fixture(scope="module")
def single_rank(converted):
    root, reference = converted
    [[results]] = run_distributed(engine_results, 1, str(root / "mcore"), [ParallelConfig()])
    return results


def test_cp1_cached_fixed_length_and_batch_match_transformers(converted, single_rank) -> None:
    _, reference = converted
    _assert_matches(reference, single_rank, "CP=1")
    sampled = _sampled(single_rank)
    assert all(len(tokens) == STEPS for tokens in sampled.values())
    assert sampled[("sampled", "text")] != reference["text"][1]  # temperature 0.9 does sample


def test_cp2_and_tp2_match_transformers_and_sample_alike(converted, single_rank) -> None:
    root, reference = converted
    layouts = {"CP=2": ParallelConfig(context_parallel_size=2), "TP=2": ParallelConfig(tensor_model_parallel_size=2)}
    for rank_results in run_distributed(engine_results, 2, str(root / "mcore"), list(layouts.values())):
        for layout, results in zip(layouts, rank_results):
            _assert_matches(reference, results, layout)
            assert _sampled(results) == _sampled(single_rank), f"{layout}: seeded samples differ from CP=1"


def test_cp4_and_tp2_cp2_match_transformers(converted, single_rank) -> None:
    root, reference = converted
    layouts = {
        "CP=4": ParallelConfig(context_parallel_size=4),
        "TP=2 x CP=2": ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2),
    }
    for rank_results in run_distributed(engine_results, 4, str(root / "mcore"), list(layouts.values()), timeout=240):
        for layout, results in zip(layouts, rank_results):
            _assert_matches(reference, results, layout)
            assert _sampled(results) == _sampled(single_rank), f"{layout}: seeded samples differ from CP=1"


def stop_and_kv_layout(load_dir: str, stop_id: int) -> tuple[list[int], list[int]]:
    """Tokens with a stop id; this rank's cache slots after prefill + 4 decode steps at CP=2."""
    from megatron_longvita.inference import GenerationConfig, KVCache, load_engine

    parallel = ParallelConfig(context_parallel_size=2)
    initialize_distributed(parallel)
    engine = load_engine(load_dir, parallel)
    prompt = engine_prompts()["text"]
    [stopped] = engine.generate([prompt], GenerationConfig(max_new_tokens=STEPS, stop_token_ids=(stop_id,)))
    caches: list[KVCache] = []
    engine.attention[0].register_forward_pre_hook(lambda module, args: caches.append(module.cache))
    engine.generate([prompt], GenerationConfig(max_new_tokens=5))
    return stopped.tokens, caches[-1].lengths


def test_stop_token_and_round_robin_cache(converted) -> None:
    root, reference = converted
    expected = reference["text"][1]
    stop_id = expected[2]
    results = run_distributed(stop_and_kv_layout, 2, str(root / "mcore"), stop_id)
    for tokens, _ in results:
        assert tokens == expected[: expected.index(stop_id) + 1]
    # 14 prompt tokens padded to 16: rank 0 holds positions 0-3 and 12-13 (+ 2 pads), rank 1
    # positions 4-11; 5 new tokens take 4 decode steps, appended round-robin: 2 per rank
    assert [lengths for _, lengths in results] == [[6 + 2], [8 + 2]]


def with_rope_parameters(hf_dir: str, out_dir: str, rope_parameters: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    config["text_config"]["rope_parameters"] = rope_parameters
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)
    os.symlink(os.path.join(hf_dir, "model.safetensors"), os.path.join(out_dir, "model.safetensors"))
    return out_dir


def test_rope_scaling_matches_transformers(converted, tmp_path) -> None:
    from megatron_longvita.inference import RopeScaling

    root, _ = converted
    cases = {
        "linear": ({"rope_type": "linear", "factor": 2.0}, RopeScaling("linear", 2.0)),
        "yarn": (
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
            RopeScaling("yarn", 4.0, original_max_position_embeddings=128),
        ),
    }
    for name, (hf_rope, ours) in cases.items():
        hf_dir = with_rope_parameters(str(root / "hf"), str(tmp_path / name), {**hf_rope, "rope_theta": 1e6})
        reference = transformers_greedy(hf_dir)
        for rank_results in run_distributed(
            engine_results, 2, str(root / "mcore"), [ParallelConfig(context_parallel_size=2)], ours
        ):
            _assert_matches(reference, rank_results[0], f"{name} RoPE scaling, CP=2")


def generate_cli(argv: list[str]) -> str:
    """Run the CLI on this rank; what it printed on stdout."""
    from megatron_longvita import generate

    with contextlib.redirect_stdout(io.StringIO()) as out:
        generate.main(argv)
    return out.getvalue()


def test_cli_chat_prompt_with_image_and_video_cp2_equals_fixed_length_cp1(converted, tmp_path) -> None:
    from tests.unit.data.factories import make_frame_dir, make_image

    root, _ = converted
    tokenizer = tiny_chat_tokenizer(str(tmp_path))
    common = [
        "--load",
        str(root / "mcore"),
        "--tokenizer",
        tokenizer,
        "--prompt",
        "what is shown in the video",
        "--image",
        make_image(str(tmp_path / "a.png"), 90, 60),
        "--max-new-tokens",
        "6",
        "--video",
        make_frame_dir(str(tmp_path / "frames"), 5),
        "--max-num-frames",
        "2",
    ]
    printed = run_distributed(
        generate_cli, 2, common + ["--cp", "2", "--stream", "--output", str(tmp_path / "cached.json")]
    )
    run_distributed(
        generate_cli, 1, common + ["--decode-mode", "fixed-length", "--output", str(tmp_path / "fixed.json")]
    )
    cached, fixed = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("cached", "fixed"))
    assert len(cached["generated_ids"]) >= 1 and cached["generated_ids"] == fixed["generated_ids"]
    assert max(abs(a - b) for a, b in zip(cached["first_logits"], fixed["first_logits"])) <= TOLERANCE
    assert printed[0].strip() == cached["text"].strip() and printed[1] == ""  # rank 0 streams
