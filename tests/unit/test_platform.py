from __future__ import annotations

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


@pytest.mark.parametrize("parallel, world_size, message", [
    (ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), 6, "not divisible by TP x PP x CP"),
    (ParallelConfig(sequence_parallel=True), 2, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (ParallelConfig(virtual_pipeline_model_parallel_size=2), 2, "--pipeline-model-parallel-size >= 2"),
])
def test_parallel_config_errors_name_the_flag(parallel: ParallelConfig, world_size: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        parallel.validate(world_size)


def test_data_parallel_size() -> None:
    assert ParallelConfig(tensor_model_parallel_size=2).data_parallel_size(8) == 4
