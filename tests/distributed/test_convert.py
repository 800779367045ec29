"""hf2mcore / mcore2hf: bit-exact round trips (both HF formats, also through a TP=2 x PP=2
checkpoint) and errors that name the offending tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_longvita.config.parallel import ParallelConfig
from megatron_longvita.platform import initialize_distributed
from tests.harness import run_distributed
from tests.references import save_tiny_internvl


def convert(*commands: list[str]) -> None:
    """Run convert_checkpoint CLI commands in turn (one spawn, several conversions)."""
    from megatron_longvita.checkpoint.convert import main

    for argv in commands:
        main(argv)


def reshard(load_dir: str, save_dir: str, parallel: ParallelConfig) -> None:
    """Load the converted checkpoint at `parallel` and save it again from there."""
    from megatron_longvita.checkpoint.dist import save_model
    from megatron_longvita.checkpoint.model_config import load_model_config, save_model_config
    from megatron_longvita.inference import load_for_inference

    initialize_distributed(parallel)
    chunks, _ = load_for_inference(load_dir, parallel)
    save_model(chunks, save_dir)
    if torch.distributed.get_rank() == 0:
        save_model_config(save_dir, *load_model_config(load_dir))


def conversion_errors(cases: dict[str, str], work: str) -> dict[str, str]:
    """hf2mcore each broken checkpoint; return the error messages."""
    from megatron_longvita.checkpoint.convert import ConversionError, hf2mcore

    messages = {}
    for name, hf_dir in cases.items():
        try:
            hf2mcore(hf_dir, f"{work}/{name}")
        except ConversionError as error:
            messages[name] = str(error)
    return messages


def tensors(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype and torch.equal(actual[name], value), f"{name} changed"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    save_tiny_internvl(str(root / "hf"))
    return root / "hf"


@pytest.fixture(scope="module")
def exported(hf_dir):
    """internvl -> mcore -> {internvl, TP2xPP2 -> internvl, longvita -> mcore -> longvita}."""
    root = hf_dir.parent
    run_distributed(convert, 1, ["hf2mcore", "--hf-dir", str(hf_dir), "--save-dir", str(root / "mcore"),
                                 "--tp", "2", "--pp", "2"])
    run_distributed(reshard, 4, str(root / "mcore"), str(root / "tp2pp2"),
                    ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2))
    run_distributed(
        convert,
        1,
        ["mcore2hf", "--load-dir", str(root / "mcore"), "--save-dir", str(root / "internvl"), "--format", "internvl"],
        ["mcore2hf", "--load-dir", str(root / "tp2pp2"), "--save-dir", str(root / "internvl_tp2pp2"),
         "--format", "internvl"],
        ["mcore2hf", "--load-dir", str(root / "mcore"), "--save-dir", str(root / "longvita"), "--format", "longvita"],
        ["hf2mcore", "--hf-dir", str(root / "longvita"), "--save-dir", str(root / "mcore_lv")],
        ["mcore2hf", "--load-dir", str(root / "mcore_lv"), "--save-dir", str(root / "longvita_again"),
         "--format", "longvita"],
    )
    return root


def test_internvl_round_trip_is_bit_exact_also_through_tp2_pp2(hf_dir, exported) -> None:
    from transformers import InternVLConfig

    original = tensors(hf_dir)
    assert_identical(tensors(exported / "internvl"), original)
    assert_identical(tensors(exported / "internvl_tp2pp2"), original)
    written = InternVLConfig.from_pretrained(str(exported / "internvl"))  # transformers accepts our config.json
    assert written.text_config.num_key_value_heads == 2 and written.vision_config.layer_scale_init_value == 0.1


def test_longvita_round_trip_is_bit_exact(exported) -> None:
    longvita = tensors(exported / "longvita")
    assert "model.vision_model.encoder.layers.1.attn.qkv.weight" in longvita  # docs/design.md, "Checkpoint names"
    assert "model.vision_projection.mlp.2.weight" in longvita and "lm_head.weight" in longvita
    assert_identical(tensors(exported / "longvita_again"), longvita)


def test_qwen2_llm_with_separate_internvit(exported, tmp_path) -> None:
    """Stage-1 start: a text-only Qwen2 checkpoint + an InternViT checkpoint; new projector."""
    longvita = tensors(exported / "longvita")
    config = json.loads((exported / "longvita" / "config.json").read_text())
    vision_prefix = "model.vision_model."
    parts = {
        "qwen2": ({k: v for k, v in config.items() if k not in ("vision_config", "downsample_ratio", "image_token_id")}
                  | {"model_type": "qwen2"},
                  {k: v for k, v in longvita.items() if not k.startswith((vision_prefix, "model.vision_projection."))}),
        "internvit": (config["vision_config"] | {"model_type": "intern_vit_6b"},
                      {k.removeprefix(vision_prefix): v for k, v in longvita.items() if k.startswith(vision_prefix)}),
    }
    for name, (part_config, part_tensors) in parts.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(part_config))
        save_file(part_tensors, str(tmp_path / name / "model.safetensors"))
    run_distributed(convert, 1,
                    ["hf2mcore", "--hf-dir", str(tmp_path / "qwen2"), "--vision-hf-dir", str(tmp_path / "internvit"),
                     "--image-token-id", "280", "--save-dir", str(tmp_path / "mcore")],
                    ["mcore2hf", "--load-dir", str(tmp_path / "mcore"), "--save-dir", str(tmp_path / "out"),
                     "--format", "longvita"])
    out = tensors(tmp_path / "out")
    assert_identical({k: v for k, v in out.items() if not k.startswith("model.vision_projection.")},
                     {k: v for k, v in longvita.items() if not k.startswith("model.vision_projection.")})
    assert "model.vision_projection.mlp.0.bias" not in out  # Long-VITA's bias-free projector, freshly initialised


def test_bad_checkpoints_fail_naming_the_tensor(hf_dir, tmp_path) -> None:
    original = tensors(hf_dir)
    wrong = "language_model.model.layers.1.self_attn.k_proj.weight"
    cases = {
        "wrong_shape": {**original, wrong: original[wrong][:-1]},
        "missing": {k: v for k, v in original.items() if k != "vision_tower.encoder.layer.0.lambda_2"},
        "extra": {**original, "vision_tower.encoder.layer.0.unknown": torch.zeros(2)},
    }
    for name, state in cases.items():
        shutil.copytree(hf_dir, tmp_path / name, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(state, str(tmp_path / name / "model.safetensors"))
    [messages] = run_distributed(conversion_errors, 1, {n: str(tmp_path / n) for n in cases}, str(tmp_path))
    assert wrong in messages["wrong_shape"] and "[31, 64]" in messages["wrong_shape"]
    assert "vision_tower.encoder.layer.0.lambda_2" in messages["missing"]
    assert "vision_tower.encoder.layer.0.unknown" in messages["extra"]


def test_sharded_index_is_read_and_written(hf_dir, tmp_path) -> None:
    """save_hf_checkpoint shards above max_shard_bytes with an index; HFCheckpoint reads it back."""
    from megatron_longvita.checkpoint.hf import HFCheckpoint, save_hf_checkpoint

    with open(hf_dir / "config.json") as f:
        config = json.load(f)
    original = tensors(hf_dir)
    save_hf_checkpoint(str(tmp_path / "sharded"), config, original, max_shard_bytes=100_000)
    sharded = HFCheckpoint(str(tmp_path / "sharded"))
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert sorted(sharded.keys()) == sorted(original)
    assert all(torch.equal(sharded.get(name), value) for name, value in original.items())
