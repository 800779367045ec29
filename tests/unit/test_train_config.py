"""Stage recipes match docs/design.md "Training stages"; `base:` includes; Megatron flags override
YAML; names are looked up in the registries; bad settings name the fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_longvita.config.parallel import ConfigError
from megatron_longvita.config.train import load_yaml, parse_args
from megatron_longvita.models.presets import get_preset
from megatron_longvita.registry import OUTPUT_HEADS, PACKING_LAYOUTS

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"

# docs/design.md "Training stages" (64 devices): seq length, TP/PP/CP/DP, global batch, iterations,
# lr -> min, packing, frames
STAGES = {
    "stage1_14b": (32768, (8, 1, 1, 8), 512, 1000, (1e-3, 1e-5), "reset", 128),
    "stage2_14b": (16384, (8, 1, 1, 8), 512, 5000, (1e-5, 1e-7), "reset", 128),
    "stage3_14b": (131072, (8, 1, 2, 4), 64, 1000, (5e-6, 1e-7), "no_reset", 512),
    "stage4_14b": (1048576, (8, 1, 8, 1), 8, 500, (5e-6, 1e-7), "no_reset", 4096),
}
TRAINABLE = {  # (vision, projector, language model)
    "stage1_14b": (False, True, False),
    "stage2_14b": (True, True, True),
    "stage3_14b": (False, True, True),
    "stage4_14b": (False, True, True),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_recipe_matches_spec(stage: str) -> None:
    config = load_yaml(str(CONFIGS / f"{stage}.yaml"))
    seq, (tp, pp, cp, dp), batch, iters, (lr, min_lr), packing, frames = STAGES[stage]
    config.validate(world_size=64, model=get_preset(config.model.preset))
    assert config.data.seq_length == seq and config.data.packing == packing
    assert config.data.media.max_num_frames == frames
    parallel = config.parallel
    assert (
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel.context_parallel_size,
        parallel.data_parallel_size(64),
    ) == (tp, pp, cp, dp)
    assert config.data.global_batch_size == batch and config.schedule.train_iters == iters
    assert (config.optimizer.lr, config.optimizer.min_lr) == (lr, min_lr)
    assert config.bf16 and parallel.sequence_parallel and config.optimizer.use_distributed_optimizer
    assert config.optimizer.weight_decay == 0.0 and config.optimizer.clip_grad == 1.0
    assert config.optimizer.adam_beta2 == 0.999 and config.data.micro_batch_size == 1
    model = config.model
    assert (not model.freeze_vision, not model.freeze_projector, not model.freeze_language_model) == TRAINABLE[stage]
    assert Path(config.data.mixture).exists()


def test_stage_specifics() -> None:
    stage2, stage3, stage4 = (load_yaml(str(CONFIGS / f"stage{n}_14b.yaml")) for n in (2, 3, 4))
    assert (stage2.optimizer.vision_lr_mult, stage2.optimizer.vision_layer_decay) == (0.1, 0.9)
    assert stage3.model.recompute_num_layers == 20
    assert stage4.model.recompute_num_layers == 48 and stage4.model.lm_head == "masked"


def test_megatron_flags_override_the_yaml() -> None:
    config = parse_args(
        [
            "--config",
            str(CONFIGS / "stage1_14b.yaml"),
            "--tensor-model-parallel-size",
            "2",
            "--lr",
            "3e-4",
            "--train-iters",
            "7",
            "--logits-mask",
            "--save",
            "/tmp/ckpt",
        ]
    )
    assert config.parallel.tensor_model_parallel_size == 2 and config.parallel.sequence_parallel
    assert config.optimizer.lr == 3e-4 and config.schedule.train_iters == 7
    assert config.model.lm_head == "masked" and config.checkpoint.save == "/tmp/ckpt"


@pytest.mark.parametrize(
    "flags, world_size, message",
    [
        (
            ["--tensor-model-parallel-size", "16"],
            64,
            r"--tensor-model-parallel-size 16 does not divide the LLM attention heads \(40\)",
        ),
        (
            ["--context-parallel-size", "2", "--seq-length", "32766"],
            64,
            r"--seq-length 32766 is not divisible by 2 x --context-parallel-size = 4",
        ),
        (
            ["--global-batch-size", "12"],
            64,
            r"--global-batch-size 12 is not divisible by --micro-batch-size x data-parallel size = 1 x 8",
        ),
        ([], 60, r"world size 60 is not divisible by TP x PP x CP"),
        (
            ["--context-parallel-size", "2", "--micro-batch-size", "2", "--global-batch-size", "8"],
            64,
            r"reset packing keeps one packed row per micro-batch",
        ),
    ],
)
def test_bad_settings_fail_with_the_fix(flags: list[str], world_size: int, message: str) -> None:
    config = parse_args(["--config", str(CONFIGS / "stage1_14b.yaml"), *flags])
    with pytest.raises(ConfigError, match=message):
        config.validate(world_size, get_preset(config.model.preset))


def test_unknown_yaml_key_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer: {lr: 1.0e-4, learning_rate: 2}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: optimizer: unknown key\(s\) \['learning_rate'\]"):
        load_yaml(str(bad))


# What each 7B recipe changes in its 14B base (the whole of the old, fully written 7B YAMLs' difference).
SEVEN_B = {1: {}, 2: {}, 3: {}, 4: {"recompute_num_layers": 28}}


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_7b_variants_are_the_14b_recipe_with_their_differences(stage: int) -> None:
    config = load_yaml(str(CONFIGS / f"stage{stage}_7b.yaml"))
    config.validate(world_size=64, model=get_preset(config.model.preset))
    reference = load_yaml(str(CONFIGS / f"stage{stage}_14b.yaml"))
    expected = dataclasses.replace(
        reference,
        model=dataclasses.replace(reference.model, preset="qwen2.5-7b", **SEVEN_B[stage]),
        parallel=dataclasses.replace(reference.parallel, tensor_model_parallel_size=4),
    )
    assert config == expected


def test_base_include_merges_resolves_relative_paths_and_refuses_cycles(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "base.yaml").write_text(
        "data: {mixture: mix.yaml, seq_length: 64, media: {max_tiles: 6, max_num_frames: 8}}\n"
        "schedule: {train_iters: 5}\n"
    )
    (tmp_path / "run.yaml").write_text("base: recipes/base.yaml\ndata: {media: {max_tiles: 2}, seq_length: 32}\n")
    config = load_yaml(str(tmp_path / "run.yaml"))
    assert (config.data.seq_length, config.data.media.max_tiles, config.data.media.max_num_frames) == (32, 2, 8)
    assert config.schedule.train_iters == 5
    assert config.data.mixture == str(tmp_path / "recipes" / "mix.yaml")  # against the YAML that names it

    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"`base:` includes form a cycle: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_yaml(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing.yaml \(the `base:` of .*c.yaml\)"):
        load_yaml(str(tmp_path / "c.yaml"))


def test_registered_names_are_accepted_and_unknown_ones_listed(tmp_path: Path) -> None:
    config = parse_args(["--config", str(CONFIGS / "stage1_14b.yaml"), "--lm-head", "plugin_head"])
    with pytest.raises(ConfigError, match=r"--lm-head: unknown output head 'plugin_head'; registered: chunked, full"):
        config.validate(64)

    @OUTPUT_HEADS.register("plugin_head")
    class PluginHead(OUTPUT_HEADS.get("full")):
        pass

    @PACKING_LAYOUTS.register("plugin_layout")
    def plugin_layout(lengths, seq_length):
        return PACKING_LAYOUTS.get("no_reset")(lengths, seq_length)

    try:
        config.validate(64)  # a plugin's head is accepted like a built-in
        recipe = tmp_path / "plugin.yaml"
        recipe.write_text(
            f"base: {CONFIGS / 'stage3_14b.yaml'}\ndata: {{packing: plugin_layout, bin_packer: greedy}}\n"
        )
        plugin = load_yaml(str(recipe))
        plugin.validate(64)
        assert (plugin.data.packing, plugin.data.bin_packer) == ("plugin_layout", "greedy")
        bad = dataclasses.replace(plugin, data=dataclasses.replace(plugin.data, bin_packer="best_fit"))
        with pytest.raises(
            ConfigError, match=r"data.bin_packer: unknown bin packer 'best_fit'; registered: ffd, greedy"
        ):
            bad.validate(64)
    finally:
        OUTPUT_HEADS._items.pop("plugin_head")
        PACKING_LAYOUTS._items.pop("plugin_layout")


def test_fields_set_by_the_model_or_launcher_are_refused_in_a_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {media: {image_size: 224}}\n")
    with pytest.raises(ConfigError, match=r"data.media: \['image_size'\] are set by the model"):
        load_yaml(str(bad))
    bad.write_text("data: {dp_rank: 1}\n")
    with pytest.raises(ConfigError, match=r"data: \['dp_rank'\] are set by the launcher"):
        load_yaml(str(bad))


def test_short_parallel_aliases_come_from_one_table() -> None:
    config = parse_args(
        ["--config", str(CONFIGS / "stage3_14b.yaml"), "--tp", "4", "--cp", "4", "--max-num-frames", "64"]
    )
    assert (config.parallel.tensor_model_parallel_size, config.parallel.context_parallel_size) == (4, 4)
    assert config.data.media.max_num_frames == 64
