"""Run one test body on N gloo ranks: free port, forkserver start, failing rank's traceback,
and a deadline instead of a hang.

Ranks start from a forkserver that has already imported torch and megatron-core, so each
rank costs a fork rather than ~9 s of imports on a 2-core machine. ``fn`` must be a
module-level function (it is pickled); its return value comes back per rank.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron_longvita.platform"]
_context = mp.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)


class RankFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(
    fn: Callable, rank: int, world_size: int, port: int, results: Any, args: tuple, kwargs: dict, env: dict[str, str]
) -> None:
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(1)  # N ranks share 2 cores; oversubscription makes gloo crawl
    try:
        from megatron_longvita.platform import setup_platform

        setup_platform()  # a rank is an entry point: the platform's patch set, once per process
        value = fn(*args, **kwargs)
    except BaseException:  # report everything, including SystemExit from a CLI under test
        results.put((rank, "error", traceback.format_exc()))
    else:
        # plain pickle keeps tensors inline: the queue's ForkingPickler would pass them through
        # shared-memory handles that die with this process
        results.put((rank, "ok", pickle.dumps(value)))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            from megatron_longvita.platform import destroy_distributed

            destroy_distributed()


def run_distributed(
    fn: Callable, world_size: int, *args: Any, timeout: float = 180.0, env: dict[str, str] | None = None, **kwargs: Any
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return the per-rank results."""
    results = _context.Queue()
    port = free_port()
    procs = [
        _context.Process(
            target=_rank_main, name=f"rank{rank}", args=(fn, rank, world_size, port, results, args, kwargs, env or {})
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(values))
                raise TimeoutError(f"{fn.__name__}: ranks {missing} did not finish within {timeout:.0f} s")
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RankFailed(f"{fn.__name__}: {dead[0].name} died with exit code {dead[0].exitcode}") from None
                continue
            if status == "error":
                raise RankFailed(f"{fn.__name__} failed on rank {rank} of {world_size}:\n{value}")
            values[rank] = pickle.loads(value)
    finally:
        for proc in procs:
            if proc.is_alive() and len(values) < world_size:
                proc.kill()
        for proc in procs:
            proc.join(timeout=30)
    return [values[rank] for rank in range(world_size)]
