"""The harness itself: results per rank, a failing rank's traceback, a deadline for hangs."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from tests.harness import RankFailed, run_distributed


def _rank_and_sum() -> tuple[int, float]:
    import torch

    dist.init_process_group("gloo")
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    return dist.get_rank(), value.item()


def _rank_one_raises() -> None:
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # rank 0 would wait here forever


def _hangs() -> None:
    time.sleep(3600)


def test_returns_each_ranks_value() -> None:
    assert run_distributed(_rank_and_sum, 3) == [(0, 6.0), (1, 6.0), (2, 6.0)]


def test_failing_rank_fails_the_run_fast_with_its_traceback() -> None:
    started = time.monotonic()
    with pytest.raises(RankFailed, match=r"(?s)rank 1 of 2.*ValueError: boom on rank one"):
        run_distributed(_rank_one_raises, 2, timeout=120)
    assert time.monotonic() - started < 60


def test_hang_times_out() -> None:
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] did not finish within 3 s"):
        run_distributed(_hangs, 2, timeout=3)
