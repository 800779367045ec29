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
import pytest
import torch

from megatron_longvita.config.parallel import ParallelConfig
from megatron_longvita.platform import initialize_distributed
from tests.harness import run_distributed

VOCAB = 300
# Its tokenizer: 278 tokens, then the 17 Long-VITA tokens (<IMG_CONTEXT> 280, <PATCH_CONTEXT> 286);
# the converter finds them by their text.
TOKENIZER_SIZE = 295
IMAGE_TOKEN = 280
PATCH_TOKEN = 286
TOKENS_PER_TILE = 4
STEPS = 8
TOLERANCE = 1e-4
OTHER_TILES = torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(2))


def save_tiny_internvl(directory: str) -> None:
    """Random (not default-initialised: zeros and constant layer scales would hide mistakes) weights."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from megatron_longvita.config.tokens import SPECIAL_TOKENS
    from tests.hf_checkpoints import qwen_style_tokenizer

    qwen_style_tokenizer(directory, TOKENIZER_SIZE, SPECIAL_TOKENS)

    config = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14, attention_bias=True),
        text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
                         tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        image_token_id=IMAGE_TOKEN, image_seq_length=TOKENS_PER_TILE, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm_weight = "norm" in name and name.endswith("weight")
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if is_norm_weight else 0.0))
    model.save_pretrained(directory)


def hf2mcore_rank(hf_dir: str, save_dir: str) -> None:
    from megatron_longvita.checkpoint.convert import hf2mcore

    hf2mcore(hf_dir, save_dir)


def prompts() -> dict[str, tuple[list[int], np.ndarray | None]]:
    """An image of 3 tiles (thumbnail + 2 patches) inside text, and a text-only prompt."""
    generator = torch.Generator().manual_seed(1)

    def text(n: int) -> list[int]:
        return torch.randint(0, IMAGE_TOKEN - 10, (n,), generator=generator).tolist()

    image = (text(5) + [IMAGE_TOKEN] * TOKENS_PER_TILE + text(2) + [PATCH_TOKEN] * TOKENS_PER_TILE + text(1)
             + [PATCH_TOKEN] * TOKENS_PER_TILE + text(4))
    pixel_values = torch.randn(3, 3, 56, 56, generator=generator).numpy()
    return {"image": (image, pixel_values), "text": (text(14), None)}


def transformers_greedy(hf_dir: str) -> dict[str, tuple[torch.Tensor, list[int]]]:
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(hf_dir).eval()
    results = {}
    for name, (ids, pixels) in prompts().items():
        # transformers knows one image token: our patch placeholders are its image placeholders.
        tokens = [IMAGE_TOKEN if t == PATCH_TOKEN else t for t in ids]
        generated, first = [], None
        with torch.no_grad():
            for _ in range(STEPS):
                pv = None if pixels is None else torch.from_numpy(pixels)
                logits = model(input_ids=torch.tensor([tokens]), pixel_values=pv).logits[0, -1]
                first = logits if first is None else first
                generated.append(int(logits.argmax()))
                tokens.append(generated[-1])
        results[name] = (first, generated)
    with torch.no_grad():  # a tile size the position embedding was not trained at: bicubic resize
        features = model.model.vision_tower(pixel_values=OTHER_TILES).last_hidden_state[:, 1:]
    results["vision_84px"] = features.reshape(len(OTHER_TILES), 6, 6, -1)
    return results


def megatron_greedy(load_dir: str, layouts: list[ParallelConfig]) -> list[dict[str, tuple[torch.Tensor, list[int]]]]:
    """Per layout: first-position logits and greedy tokens (logits only under SP: lengths vary)."""
    from megatron_longvita.generate import greedy_generate, last_position_logits, load_for_inference

    per_layout = []
    for parallel in layouts:
        initialize_distributed(parallel)
        chunks, vocab = load_for_inference(load_dir, parallel)
        results = {}
        for name, (ids, pixels) in prompts().items():
            pv = None if pixels is None else torch.from_numpy(pixels)
            if parallel.sequence_parallel:
                results[name] = (last_position_logits(chunks, torch.tensor([ids]), pv, vocab), None)
            else:
                generation = greedy_generate(chunks, ids, pv, STEPS, vocab)
                results[name] = (generation.first_logits, generation.tokens)
        per_layout.append(results)
    return per_layout


def vision_features(load_dir: str, pixel_values: torch.Tensor) -> torch.Tensor:
    from megatron_longvita.generate import load_for_inference

    initialize_distributed(ParallelConfig())
    [model], _ = load_for_inference(load_dir, ParallelConfig())
    with torch.no_grad():
        return model.vision(pixel_values)


# Replicated parameters of the vision tower and projector: their full gradients on every rank.
VISION_GRADS = ("vision.class_embedding", "vision.position_embedding", "vision.patch_embedding.weight",
                "vision.decoder.layers.0.ls1", "vision.decoder.layers.1.ls2",
                "vision.decoder.layers.0.input_layernorm.weight", "projector.layer_norm.weight")


def vision_gradients(load_dir: str, layouts: list[ParallelConfig]) -> list[dict[str, torch.Tensor]]:
    """Gradients of the summed LM loss on the image prompt, per layout.

    Sequence-parallel parameters hold partial gradients until megatron's finalize_model_grads
    all-reduces them over TP; the same reduction is done here.
    """
    from megatron.core import parallel_state

    from megatron_longvita.generate import load_for_inference

    ids, pixels = prompts()["image"]
    tokens = torch.tensor([ids])
    per_layout = []
    for parallel in layouts:
        initialize_distributed(parallel)
        [model], _ = load_for_inference(load_dir, parallel)
        loss = model(tokens, torch.arange(len(ids)).unsqueeze(0), None, pixel_values=torch.from_numpy(pixels),
                     labels=torch.roll(tokens, -1, dims=1))
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


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    save_tiny_internvl(str(root / "hf"))
    run_distributed(hf2mcore_rank, 1, str(root / "hf"), str(root / "mcore"))
    return root, transformers_greedy(str(root / "hf"))


def _assert_matches(reference, results, layout: str) -> None:
    for name, (logits, tokens) in results.items():  # the prompts
        expected_logits, expected_tokens = reference[name]
        error = (logits - expected_logits).abs().max().item()
        assert error <= TOLERANCE, f"{layout}, {name} prompt: first-position logits differ by {error:.2e}"
        if tokens is not None:
            assert tokens == expected_tokens, f"{layout}, {name} prompt: greedy tokens differ"


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
    layouts = {"TP=2": ParallelConfig(tensor_model_parallel_size=2),
               "TP=2 + SP": ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
               "PP=2": ParallelConfig(pipeline_model_parallel_size=2)}
    for rank_results in run_distributed(megatron_greedy, 2, str(root / "mcore"), list(layouts.values())):
        for layout, results in zip(layouts, rank_results):
            _assert_matches(reference, results, layout)


def test_vision_gradients_under_tp2_and_sp_equal_tp1(converted) -> None:
    root, _ = converted
    [[reference]] = run_distributed(vision_gradients, 1, str(root / "mcore"), [ParallelConfig()])
    layouts = [ParallelConfig(tensor_model_parallel_size=2),
               ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)]
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
    run_distributed(generate_cli, 2, ["--load", str(root / "mcore"), "--tp", "1", "--pp", "2",
                                      "--input-ids-file", str(tmp_path / "ids.json"),
                                      "--pixel-values-file", str(tmp_path / "pv.npy"),
                                      "--max-new-tokens", str(STEPS), "--greedy",
                                      "--output", str(tmp_path / "out.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    logits, tokens = reference["image"]
    assert out["generated_ids"] == tokens
    assert (torch.tensor(out["first_logits"]) - logits).abs().max().item() <= TOLERANCE
