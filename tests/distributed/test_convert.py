"""hf2mcore / mcore2hf on transformers' InternVL: bit-exact round trips (also through a TP=2 x PP=2
checkpoint), a complete exported directory, and errors that name the offending tensor.
The released Long-VITA layout and the qwen2 + InternViT start: test_checkpoint_formats.py."""

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
        save_model_config(save_dir, *load_model_config(load_dir), tokenizer=f"{load_dir}/tokenizer")


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
    """internvl -> mcore -> {internvl, TP2xPP2 -> internvl}; a longvita export is refused (biased projector)."""
    root = hf_dir.parent
    run_distributed(
        convert, 1, ["hf2mcore", "--hf-dir", str(hf_dir), "--save-dir", str(root / "mcore"), "--tp", "2", "--pp", "2"]
    )
    run_distributed(
        reshard,
        4,
        str(root / "mcore"),
        str(root / "tp2pp2"),
        ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
    )
    run_distributed(
        convert,
        1,
        ["mcore2hf", "--load-dir", str(root / "mcore"), "--save-dir", str(root / "internvl"), "--format", "internvl"],
        [
            "mcore2hf",
            "--load-dir",
            str(root / "tp2pp2"),
            "--save-dir",
            str(root / "internvl_tp2pp2"),
            "--format",
            "internvl",
        ],
    )
    return root


def test_internvl_round_trip_is_bit_exact_also_through_tp2_pp2(hf_dir, exported) -> None:
    from transformers import InternVLConfig

    original = tensors(hf_dir)
    assert_identical(tensors(exported / "internvl"), original)
    assert_identical(tensors(exported / "internvl_tp2pp2"), original)
    written = InternVLConfig.from_pretrained(str(exported / "internvl"))  # transformers accepts our config.json
    assert written.text_config.num_key_value_heads == 2 and written.vision_config.layer_scale_init_value == 0.1


def test_export_is_a_complete_hf_directory(exported) -> None:
    from transformers import AutoConfig, AutoTokenizer

    out = exported / "internvl"
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= {p.name for p in out.iterdir()}
    config = AutoConfig.from_pretrained(str(out))
    assert config.image_token_id == 280 and config.text_config.rope_parameters["rope_theta"] == 1e6
    raw = json.loads((out / "config.json").read_text())
    assert raw["text_config"]["rope_theta"] == 1e6 and raw["text_config"]["max_position_embeddings"] == 512
    assert raw["torch_dtype"] == raw["dtype"] == "float32"
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == 280
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def export_errors(load_dir: str, save_dir: str) -> str:
    from megatron_longvita.checkpoint.convert import ConversionError, mcore2hf

    try:
        mcore2hf(load_dir, save_dir, "longvita")
    except ConversionError as error:
        return str(error)
    return "exported"


def test_longvita_export_of_an_internvl_projector_is_refused(exported, tmp_path) -> None:
    [message] = run_distributed(export_errors, 1, str(exported / "mcore"), str(tmp_path / "lv"))
    assert "bias-free" in message and "bias=True" in message and "width 64" in message


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
