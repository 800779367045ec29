"""Checkpoints as users bring them, against an independent reference built from transformers' modules.

Three sources, each converted with hf2mcore and run at TP=2, CP=2 (the inference engine) and
PP=2 (fixed-length decoding through the pipeline): first generated position's logits within 1e-4 (fp32) and 8
greedy tokens identical to the reference.
- the released Long-VITA layout (tests/hf_checkpoints.py: `visual` sub-config, InternViT names,
  bias-free 4 x vit -> vit -> llm projector), with a stock-Qwen-style tokenizer that lacks the
  Long-VITA tokens (appended by the converter) and a vocabulary padded beyond it, as released;
  reference: `Oracle` (InternVLVisionModel + nn.Sequential projector + Qwen2ForCausalLM);
- a transformers InternVL checkpoint with 251 tokens and <IMG_CONTEXT> = 247 (it defines no patch
  or video placeholder); reference: InternVLForConditionalGeneration;
- a Qwen2 LLM + an InternViT checkpoint (stage-1 start, fresh projector); reference: the oracle
  with the converted projector's weights.
Round trips are bit-exact; exported configs carry every key transformers' Qwen2Config (4.4x and
5.x) and the authors' InternVisionConfig read.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_longvita.config.parallel import ParallelConfig
from megatron_longvita.platform import initialize_distributed
from tests.harness import run_distributed
from tests.hf_checkpoints import Oracle, save_released_longvita, save_small_vocab_internvl, save_split_qwen2_internvit

VOCAB = 300
TOKENIZER_SIZE = 240  # Long-VITA tokens appended: <IMG_CONTEXT> 242, <VID_CONTEXT> 245, <PATCH_CONTEXT> 248
IMG, VID, PATCH = 242, 245, 248
TOKENS_PER_TILE = 4
STEPS = 8
TOLERANCE = 1e-4
LAYOUTS = {
    "TP=2": ParallelConfig(tensor_model_parallel_size=2),
    "CP=2": ParallelConfig(context_parallel_size=2),
    "PP=2": ParallelConfig(pipeline_model_parallel_size=2),
}
# What the authors' config classes read (their __init__ arguments): transformers 4.4x's Qwen2Config
# (LongVITAConfig subclasses it) and OpenGVLab's InternVisionConfig.
QWEN2_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "attention_dropout",
)
INTERN_VISION_CONFIG_KEYS = (
    "num_channels",
    "patch_size",
    "image_size",
    "qkv_bias",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "qk_normalization",
    "num_hidden_layers",
    "use_flash_attn",
    "hidden_act",
    "norm_type",
    "layer_norm_eps",
    "dropout",
    "drop_path_rate",
    "attention_dropout",
    "initializer_range",
    "initializer_factor",
)


def prompts(image: int, patch: int) -> dict[str, tuple[list[int], torch.Tensor | None]]:
    """An image of 3 tiles inside text (thumbnail on `image`, tiles on `patch`), and text only."""
    generator = torch.Generator().manual_seed(1)

    def text(n: int) -> list[int]:
        return torch.randint(0, 230, (n,), generator=generator).tolist()

    ids = (
        text(5)
        + [image] * TOKENS_PER_TILE
        + text(2)
        + [patch] * TOKENS_PER_TILE
        + text(1)
        + [patch] * TOKENS_PER_TILE
        + text(4)
    )
    return {"image": (ids, torch.randn(3, 3, 56, 56, generator=generator)), "text": (text(14), None)}


def convert(*commands: list[str]) -> None:
    from megatron_longvita.checkpoint.convert import main

    for argv in commands:
        main(argv)


def megatron_results(load_dir: str, image: int, patch: int) -> dict[str, dict]:
    """Per layout and prompt: the engine's (first-position logits, greedy tokens); fixed-length
    decoding through the pipeline at PP > 1, the KV cache otherwise."""
    from megatron_longvita.inference import GenerationConfig, GenerationRequest, load_engine

    results = {}
    for layout, parallel in LAYOUTS.items():
        initialize_distributed(parallel)
        engine = load_engine(load_dir, parallel)
        mode = "fixed-length" if parallel.pipeline_model_parallel_size > 1 else "cached"
        per_prompt = {}
        for name, (ids, pixels) in prompts(image, patch).items():
            [generation] = engine.generate(
                [GenerationRequest(ids, pixels)], GenerationConfig(max_new_tokens=STEPS, decode_mode=mode)
            )
            per_prompt[name] = (generation.first_logits, generation.tokens)
        results[layout] = per_prompt
    return results


def assert_matches(reference: dict, load_dir: str, image: int, patch: int) -> None:
    for rank_results in run_distributed(megatron_results, 2, load_dir, image, patch, timeout=400):
        for layout, per_prompt in rank_results.items():
            for name, (logits, tokens) in per_prompt.items():
                expected_logits, expected_tokens = reference[name]
                error = (logits - expected_logits).abs().max().item()
                assert error <= TOLERANCE, f"{layout}, {name}: first-position logits differ by {error:.2e}"
                assert tokens == expected_tokens, f"{layout}, {name}: greedy {tokens} != {expected_tokens}"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every source written, converted and exported again (one conversion process)."""
    root = tmp_path_factory.mktemp("formats")
    oracle = Oracle(VOCAB)
    save_released_longvita(str(root / "released"), oracle, TOKENIZER_SIZE)
    save_split_qwen2_internvit(str(root / "released"), str(root / "qwen2"), str(root / "internvit"))
    image_token = save_small_vocab_internvl(str(root / "internvl"))
    run_distributed(
        convert,
        1,
        ["hf2mcore", "--hf-dir", str(root / "released"), "--save-dir", str(root / "mcore_lv")],
        [
            "mcore2hf",
            "--load-dir",
            str(root / "mcore_lv"),
            "--save-dir",
            str(root / "export_lv"),
            "--format",
            "longvita",
        ],
        ["hf2mcore", "--hf-dir", str(root / "export_lv"), "--save-dir", str(root / "mcore_lv2")],
        [
            "mcore2hf",
            "--load-dir",
            str(root / "mcore_lv2"),
            "--save-dir",
            str(root / "export_lv2"),
            "--format",
            "longvita",
        ],
        [
            "hf2mcore",
            "--hf-dir",
            str(root / "qwen2"),
            "--vision-hf-dir",
            str(root / "internvit"),
            "--save-dir",
            str(root / "mcore_pair"),
        ],
        [
            "mcore2hf",
            "--load-dir",
            str(root / "mcore_pair"),
            "--save-dir",
            str(root / "export_pair"),
            "--format",
            "longvita",
        ],
        [
            "mcore2hf",
            "--load-dir",
            str(root / "mcore_pair"),
            "--save-dir",
            str(root / "export_pair_qwen2"),
            "--format",
            "qwen2",
        ],
        ["hf2mcore", "--hf-dir", str(root / "internvl"), "--save-dir", str(root / "mcore_ivl")],
        [
            "mcore2hf",
            "--load-dir",
            str(root / "mcore_ivl"),
            "--save-dir",
            str(root / "export_ivl"),
            "--format",
            "internvl",
        ],
    )
    return root, oracle, image_token


def tensors(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype and torch.equal(actual[name], value), f"{name} changed"


def oracle_reference(oracle: Oracle, image: int, patch: int) -> dict:
    return {
        name: oracle.greedy(ids, pixels, (image, patch), STEPS) for name, (ids, pixels) in prompts(image, patch).items()
    }


def test_released_longvita_matches_the_oracle_at_tp2_cp2_pp2(converted) -> None:
    root, oracle, _ = converted
    sidecar = json.loads((root / "mcore_lv" / "longvita_config.json").read_text())["model"]
    assert (sidecar["image_token_id"], sidecar["video_token_id"], sidecar["patch_token_id"]) == (IMG, VID, PATCH)
    assert sidecar["projector"] == {"downsample_ratio": 0.5, "bias": False, "ffn_hidden_size": 32, "norm_epsilon": 1e-5}
    assert_matches(oracle_reference(oracle, IMG, PATCH), str(root / "mcore_lv"), IMG, PATCH)


def test_small_vocab_internvl_matches_transformers_at_tp2_cp2_pp2(converted) -> None:
    from transformers import InternVLForConditionalGeneration

    root, _, image_token = converted
    assert image_token == 247
    sidecar = json.loads((root / "mcore_ivl" / "longvita_config.json").read_text())["model"]
    assert (sidecar["image_token_id"], sidecar["patch_token_id"], sidecar["video_token_id"]) == (247, None, None)
    model = InternVLForConditionalGeneration.from_pretrained(str(root / "internvl")).eval()
    reference = {}
    for name, (ids, pixels) in prompts(image_token, image_token).items():  # InternVL: every tile on one token
        tokens, generated, first = list(ids), [], None
        with torch.no_grad():
            for _ in range(STEPS):
                logits = model(input_ids=torch.tensor([tokens]), pixel_values=pixels).logits[0, -1]
                first = logits if first is None else first
                generated.append(int(logits.argmax()))
                tokens.append(generated[-1])
        assert image_token not in generated, "a placeholder was generated: pick another seed"
        reference[name] = (first, generated)
    assert_matches(reference, str(root / "mcore_ivl"), image_token, image_token)


def test_qwen2_and_internvit_start_matches_the_oracle_at_tp2_cp2_pp2(converted) -> None:
    root, oracle, _ = converted
    projector = tensors(root / "export_pair")
    fresh = Oracle(VOCAB)
    fresh.load_state_dict(oracle.state_dict())
    norm, fc1, _, fc2 = fresh.projector
    with torch.no_grad():  # the converter's freshly initialised projector
        norm.weight.copy_(projector["model.vision_projection.pre_proj_layernorm.weight"])
        norm.bias.copy_(projector["model.vision_projection.pre_proj_layernorm.bias"])
        fc1.weight.copy_(projector["model.vision_projection.mlp.0.weight"])
        fc2.weight.copy_(projector["model.vision_projection.mlp.2.weight"])
    assert_matches(oracle_reference(fresh, IMG, PATCH), str(root / "mcore_pair"), IMG, PATCH)


def test_round_trips_are_bit_exact(converted) -> None:
    root, _, _ = converted
    released = tensors(root / "released")
    assert_identical(tensors(root / "export_lv"), released)
    assert_identical(tensors(root / "export_lv2"), released)
    assert_identical(tensors(root / "export_ivl"), tensors(root / "internvl"))
    assert_identical(tensors(root / "export_pair_qwen2"), tensors(root / "qwen2"))
    pair = tensors(root / "export_pair")
    assert_identical(
        {k: v for k, v in pair.items() if not k.startswith("model.vision_projection.")},
        {k: v for k, v in released.items() if not k.startswith("model.vision_projection.")},
    )
    assert "model.vision_projection.mlp.0.bias" not in pair  # Long-VITA's bias-free projector


def test_longvita_export_keeps_the_released_config_and_what_its_readers_need(converted) -> None:
    from transformers import Qwen2Config

    root, _, _ = converted
    released = json.loads((root / "released" / "config.json").read_text())
    exported = json.loads((root / "export_lv" / "config.json").read_text())
    for key, value in released.items():
        if key not in ("visual", "transformers_version"):
            assert exported[key] == value, f"config.json {key}: {exported.get(key)!r} != released {value!r}"
    for key, value in released["visual"].items():
        if key not in ("auto_map", "transformers_version"):  # auto_map names code files we do not ship
            assert exported["visual"][key] == value, f"visual.{key}: {exported['visual'].get(key)!r} != {value!r}"
    assert set(QWEN2_CONFIG_KEYS) <= exported.keys()
    assert set(INTERN_VISION_CONFIG_KEYS) <= exported["visual"].keys()
    assert exported["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}
    assert exported["dtype"] == exported["torch_dtype"] == "float32"
    config = Qwen2Config.from_pretrained(str(root / "export_lv"))  # what LongVITAConfig is, under transformers 5
    assert config.rope_parameters["rope_theta"] == 1e6 and config.max_position_embeddings == 4096
    assert config.visual["hidden_size"] == 32


def test_exports_load_with_transformers(converted) -> None:
    from transformers import AutoConfig, AutoTokenizer

    root, _, _ = converted
    qwen2 = AutoConfig.from_pretrained(str(root / "export_pair_qwen2"))
    assert qwen2.model_type == "qwen2" and qwen2.rope_parameters["rope_theta"] == 1e6
    internvl = AutoConfig.from_pretrained(str(root / "export_ivl"))
    assert internvl.image_token_id == 247 and internvl.text_config.vocab_size == 251
    tokenizer = AutoTokenizer.from_pretrained(str(root / "export_lv"))
    longvita_tokens = (
        "<img>",
        "</img>",
        "<IMG_CONTEXT>",
        "<vid>",
        "</vid>",
        "<VID_CONTEXT>",
        "<patch>",
        "</patch>",
        "<PATCH_CONTEXT>",
        "<quad>",
        "</quad>",
        "<ref>",
        "</ref>",
        "<box>",
        "</box>",
        "<image>",
        "<video>",
    )
    assert tokenizer.convert_tokens_to_ids(list(longvita_tokens)) == list(range(TOKENIZER_SIZE, TOKENIZER_SIZE + 17))
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n")
    generation = json.loads((root / "export_lv" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]


def test_a_vocabulary_too_small_for_the_tokens_names_the_token(converted, tmp_path) -> None:
    import shutil

    from megatron_longvita.checkpoint.convert import hf2mcore
    from megatron_longvita.checkpoint.tokenizer import TokenizerError

    root, _, _ = converted
    shutil.copytree(root / "released", tmp_path / "small")
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    (tmp_path / "small" / "config.json").write_text(json.dumps(config | {"vocab_size": TOKENIZER_SIZE + 10}))
    with pytest.raises(
        TokenizerError,
        match=f"token </quad> has id {TOKENIZER_SIZE + 10}, outside the model's vocabulary of {TOKENIZER_SIZE + 10}",
    ):
        hf2mcore(str(tmp_path / "small"), str(tmp_path / "out"))  # refused before any weight is read


def load_with_config(load_dir: str, allow_unused: bool) -> str:
    from megatron_longvita.checkpoint.dist import CheckpointMismatch, load_model
    from megatron_longvita.checkpoint.model_config import load_model_config
    from megatron_longvita.models.long_vita import build_long_vita

    initialize_distributed(ParallelConfig())
    config, dtype = load_model_config(load_dir)
    try:
        load_model([build_long_vita(config, ParallelConfig(), params_dtype=dtype)], load_dir, allow_unused)
    except CheckpointMismatch as error:
        return str(error)
    return "loaded"


def test_tensors_the_model_lacks_are_refused_not_dropped(converted, tmp_path) -> None:
    """A checkpoint with projector biases under a config without them: the load fails naming them."""
    import shutil

    root, _, _ = converted
    shutil.copytree(root / "mcore_ivl", tmp_path / "ckpt")
    sidecar_path = tmp_path / "ckpt" / "longvita_config.json"
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["model"]["projector"]["bias"] = False
    sidecar_path.write_text(json.dumps(sidecar))
    [message] = run_distributed(load_with_config, 1, str(tmp_path / "ckpt"), False)
    assert "projector.linear_fc1.bias" in message and "projector.linear_fc2.bias" in message
    assert run_distributed(load_with_config, 1, str(tmp_path / "ckpt"), True) == ["loaded"]


def test_train_builds_the_checkpoint_model_and_refuses_a_disagreeing_preset(converted) -> None:
    from megatron_longvita.config.parallel import ConfigError
    from megatron_longvita.config.train import CheckpointSection, ModelSection, TrainConfig
    from megatron_longvita.data import ChatTokenizer
    from megatron_longvita.train import resolve_model

    root, _, _ = converted
    load = str(root / "mcore_lv")
    tokenizer = ChatTokenizer.from_dir(f"{load}/tokenizer")
    config = TrainConfig(checkpoint=CheckpointSection(load=load))
    model = resolve_model(config, tokenizer)
    assert model.projector.ffn_hidden_size == 32 and model.decoder.max_position_embeddings == 4096
    with pytest.raises(ConfigError, match=r"decoder.max_position_embeddings: preset 512, checkpoint 4096"):
        resolve_model(
            TrainConfig(model=ModelSection(preset="tiny"), checkpoint=CheckpointSection(load=load)), tokenizer
        )
    with pytest.raises(ConfigError, match=r"defines no <PATCH_CONTEXT>, <VID_CONTEXT>"):
        resolve_model(TrainConfig(checkpoint=CheckpointSection(load=str(root / "mcore_ivl"))), tokenizer)
