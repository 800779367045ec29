from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_longvita.config.parallel import ConfigError, ParallelConfig
from megatron_longvita.platform import PLATFORM_ENV, describe_platform, detect_platform


def test_env_override_and_bad_value(monkeypatch) -> None:
    monkeypatch.setenv(PLATFORM_ENV, "cpu")
    assert detect_platform() == "cpu"
    monkeypatch.setenv(PLATFORM_ENV, "tpu")
    with pytest.raises(ValueError, match=f"{PLATFORM_ENV}='tpu'"):
        detect_platform()


@pytest.mark.parametrize("name, backend", [("cpu", "gloo"), ("cuda", "nccl"), ("npu", "hccl")])
def test_backend_per_platform(name: str, backend: str) -> None:
    assert describe_platform(name).backend == backend


@pytest.mark.parametrize(
    "parallel, world_size, message",
    [
        (
            ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
            6,
            "not divisible by TP x PP x CP",
        ),
        (ParallelConfig(sequence_parallel=True), 2, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
        (ParallelConfig(virtual_pipeline_model_parallel_size=2), 2, "--pipeline-model-parallel-size >= 2"),
    ],
)
def test_parallel_config_errors_name_the_flag(parallel: ParallelConfig, world_size: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        parallel.validate(world_size)


def test_data_parallel_size() -> None:
    assert ParallelConfig(tensor_model_parallel_size=2).data_parallel_size(8) == 4


def test_building_configs_and_specs_patches_nothing_and_distributed_init_asks_for_the_entry_point() -> None:
    """Model code only detects the platform; the patches are the entry point's (setup_platform)."""
    code = """
from megatron_longvita import patches
from megatron_longvita.config.parallel import ParallelConfig
from megatron_longvita.models.presets import get_preset
from megatron_longvita.models.specs import LLM, VISION, get_layer_spec, select_layer_spec
from megatron_longvita.platform import current_platform, initialize_distributed
model, platform = get_preset("tiny"), current_platform()
for tower, config in ((LLM, model.decoder), (VISION, model.vision)):
    for purpose in ("train", "inference"):
        name = select_layer_spec(tower, platform, context_parallel_size=2, purpose=purpose)
        get_layer_spec(name, tower).build(config.transformer_config(ParallelConfig(), platform=platform), platform)
print("applied:", len(patches.applied()), patches.is_applied("cpu"))
try:
    initialize_distributed(ParallelConfig())
except RuntimeError as error:
    print(error)
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "LONGVITA_PLATFORM": "cpu"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "applied: 0 False"
    assert "patch set is not applied; call megatron_longvita.platform.setup_platform()" in lines[1]
