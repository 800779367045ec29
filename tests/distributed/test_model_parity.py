"""Logits parity of the converted Long-VITA model against transformers' InternVL.

A tiny random InternVLForConditionalGeneration (GQA 4 heads / 2 groups, vocab 300 — not a
multiple of 128 x TP —, 2 vision layers, 56 px tiles -> 4 tokens per tile) is saved with
save_pretrained, converted with hf2mcore and run at TP=1, TP=2, TP=2 + sequence parallel and
PP=2. Tolerance: first generated position's logits within 1e-4 max abs (fp32; measured ~1e-5),
greedy tokens identical for 8 steps (transformers also re-runs the full prompt per step).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from megatron_longvita.config.parallel import ParallelConfig
from megatron_longvita.platform import initialize_distributed
from tests.harness import run_distributed
from tests.references import OTHER_TILES, STEPS, TOLERANCE, comparable_tokens, prompts


def megatron_greedy(load_dir: str, layouts: list[ParallelConfig]) -> list[dict[str, tuple[torch.Tensor, list[int]]]]:
    """Per layout: the engine's first-position logits and greedy tokens (fixed-length through the
    pipeline at PP > 1); under SP, which the engine does not run, the model's last-position logits."""
    from megatron_longvita.inference import GenerationConfig, GenerationRequest, load_engine, load_for_inference
    from megatron_longvita.models.long_vita import gather_logits

    per_layout = []
    for parallel in layouts:
        initialize_distributed(parallel)
        results = {}
        if parallel.sequence_parallel:
            [model], vocab = load_for_inference(load_dir, parallel)
            for name, (ids, pixels) in prompts().items():
                pv = None if pixels is None else torch.from_numpy(pixels)
                with torch.no_grad():
                    logits = model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), None, pixel_values=pv)
                results[name] = (gather_logits(logits[0, -1], vocab).float(), None)
        else:
            engine = load_engine(load_dir, parallel)
            mode = "fixed-length" if parallel.pipeline_model_parallel_size > 1 else "cached"
            for name, (ids, pixels) in prompts().items():
                request = GenerationRequest(ids, None if pixels is None else torch.from_numpy(pixels))
                [generation] = engine.generate([request], GenerationConfig(STEPS, decode_mode=mode))
                results[name] = (generation.first_logits, generation.tokens)
        per_layout.append(results)
    return per_layout


def vision_features(load_dir: str, pixel_values: torch.Tensor) -> torch.Tensor:
    from megatron_longvita.inference import load_for_inference

    initialize_distributed(ParallelConfig())
    [model], _ = load_for_inference(load_dir, ParallelConfig())
    with torch.no_grad():
        return model.vision(pixel_values)


# Replicated parameters of the vision tower and projector: their full gradients on every rank.
VISION_GRADS = (
    "vision.class_embedding",
    "vision.position_embedding",
    "vision.patch_embedding.weight",
    "vision.decoder.layers.0.ls1",
    "vision.decoder.layers.1.ls2",
    "vision.decoder.layers.0.input_layernorm.weight",
    "projector.layer_norm.weight",
)


def vision_gradients(load_dir: str, layouts: list[ParallelConfig]) -> list[dict[str, torch.Tensor]]:
    """Gradients of the summed LM loss on the image prompt, per layout.

    Sequence-parallel parameters hold partial gradients until megatron's finalize_model_grads
    all-reduces them over TP; the same reduction is done here.
    """
    from megatron.core import parallel_state

    from megatron_longvita.inference import load_for_inference

    ids, pixels = prompts()["image"]
    tokens = torch.tensor([ids])
    per_layout = []
    for parallel in layouts:
        initialize_distributed(parallel)
        [model], _ = load_for_inference(load_dir, parallel)
        loss = model(
            tokens,
            torch.arange(len(ids)).unsqueeze(0),
            None,
            pixel_values=torch.from_numpy(pixels),
            labels=torch.roll(tokens, -1, dims=1),
        )
        loss.sum().backward()
        params = dict(model.named_parameters())
        for name in VISION_GRADS:
            if getattr(params[name], "sequence_parallel", False):
                torch.distributed.all_reduce(params[name].grad, group=parallel_state.get_tensor_model_parallel_group())
        per_layout.append({name: params[name].grad.clone() for name in VISION_GRADS})
    return per_layout


def generate_cli(argv: list[str]) -> None:
    from megatron_longvita import generate

    generate.main(argv)


def _assert_matches(reference, results, layout: str) -> None:
    for name, (logits, tokens) in results.items():  # the prompts
        expected_logits, expected_tokens = reference[name]
        error = (logits - expected_logits).abs().max().item()
        assert error <= TOLERANCE, f"{layout}, {name} prompt: first-position logits differ by {error:.2e}"
        if tokens is not None:  # the engine never emits a vision placeholder; transformers may
            expected = comparable_tokens(expected_tokens)
            assert tokens[: len(expected)] == expected, f"{layout}, {name} prompt: greedy tokens differ"


def test_tp1_matches_transformers(converted) -> None:
    root, reference = converted
    [[results]] = run_distributed(megatron_greedy, 1, str(root / "mcore"), [ParallelConfig()])
    _assert_matches(reference, results, "TP=1")


def test_position_embedding_is_interpolated_like_transformers(converted) -> None:
    root, reference = converted
    [features] = run_distributed(vision_features, 1, str(root / "mcore"), OTHER_TILES)
    assert (features - reference["vision_84px"]).abs().max().item() <= TOLERANCE


def test_tp2_sp_and_pp2_match_transformers(converted) -> None:
    root, reference = converted
    layouts = {
        "TP=2": ParallelConfig(tensor_model_parallel_size=2),
        "TP=2 + SP": ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
        "PP=2": ParallelConfig(pipeline_model_parallel_size=2),
    }
    for rank_results in run_distributed(megatron_greedy, 2, str(root / "mcore"), list(layouts.values())):
        for layout, results in zip(layouts, rank_results):
            _assert_matches(reference, results, layout)


def test_vision_gradients_under_tp2_and_sp_equal_tp1(converted) -> None:
    root, _ = converted
    [[reference]] = run_distributed(vision_gradients, 1, str(root / "mcore"), [ParallelConfig()])
    layouts = [
        ParallelConfig(tensor_model_parallel_size=2),
        ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
    ]
    for rank_results in run_distributed(vision_gradients, 2, str(root / "mcore"), layouts):
        for parallel, grads in zip(layouts, rank_results):
            for name, grad in grads.items():
                error = (grad - reference[name]).abs().max().item()
                scale = reference[name].abs().max().item()
                assert error <= TOLERANCE * scale, f"{parallel}: {name} gradient off by {error:.2e}"


def test_generate_cli_at_pp2(converted, tmp_path) -> None:
    root, reference = converted
    ids, pixels = prompts()["image"]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    np.save(tmp_path / "pv.npy", pixels)
    run_distributed(
        generate_cli,
        2,
        [
            "--load",
            str(root / "mcore"),
            "--tp",
            "1",
            "--pp",
            "2",
            "--input-ids-file",
            str(tmp_path / "ids.json"),
            "--pixel-values-file",
            str(tmp_path / "pv.npy"),
            "--max-new-tokens",
            str(STEPS),
            "--greedy",
            "--output",
            str(tmp_path / "out.json"),
        ],
    )
    out = json.loads((tmp_path / "out.json").read_text())
    logits, tokens = reference["image"]
    expected = comparable_tokens(tokens)
    assert out["generated_ids"][: len(expected)] == expected
    assert (torch.tensor(out["first_logits"]) - logits).abs().max().item() <= TOLERANCE
