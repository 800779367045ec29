"""The engine loop every rank runs: rank 0 broadcasts each command, all ranks run it together.

Commands travel over a gloo group of all ranks (CPU objects, whatever the accelerator
backend): a batch (prompts with their tiles + one GenerationConfig), ``idle`` once a second
without work (so the other ranks' waits never reach the group timeout and they notice a
vanished rank 0), or ``shutdown``. Inside a batch, after every step rank 0 broadcasts which
rows are done (their own limit, a stop string, a client gone): once all are, every rank leaves
the engine at the same step. An exception inside the engine is agreed on by an all-reduce
after the batch, so all ranks go on to the next command together; rank 0 fails the batch's
unfinished requests with a 500.
"""

from __future__ import annotations

import datetime
import logging
import random
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_longvita.inference import GenerationConfig, GenerationRequest, InferenceEngine, SamplingConfig
from megatron_longvita.parallel.decode import wait_collective
from megatron_longvita.serve.scheduler import Job, Scheduler

logger = logging.getLogger(__name__)

IDLE_S = 1.0
IDLE, SHUTDOWN = "idle", "shutdown"


@dataclass
class Batch:
    prompts: list[GenerationRequest]
    config: GenerationConfig


class ControlChannel:
    def __init__(self, timeout_minutes: int = 30) -> None:
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
        self.rank = dist.get_rank()

    def broadcast(self, command: object) -> object:
        box = [command]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def broadcast_flags(self, flags: Optional[Sequence[bool]], count: int) -> list[bool]:
        tensor = torch.tensor(flags, dtype=torch.uint8) if self.rank == 0 else torch.empty(count, dtype=torch.uint8)
        # once per decode step: a parked gloo thread can take a scheduler time slice to wake
        wait_collective(dist.broadcast(tensor, src=0, group=self.group, async_op=True), self.group)
        return tensor.bool().tolist()

    def any(self, value: bool) -> bool:
        tensor = torch.tensor([int(value)])
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return bool(tensor.item())


class _BatchDone(Exception):
    """Every row of the batch is done: leave the engine at this step (raised on all ranks alike)."""


def batch_config(jobs: Sequence[Job], eos_id: int, pad_id: int) -> GenerationConfig:
    s = jobs[0].sampling  # the batch key makes these the same for all rows
    seed = s.seed if s.seed is not None else random.randrange(2**31)
    return GenerationConfig(
        max_new_tokens=max(job.max_tokens for job in jobs),
        sampling=SamplingConfig(s.temperature, s.top_k, s.top_p, seed),
        stop_token_ids=() if jobs[0].ignore_eos else (eos_id,),
        pad_token_id=pad_id,
    )


def run_batch(
    engine: InferenceEngine,
    channel: ControlChannel,
    batch: Batch,
    jobs: Optional[list[Job]],
    on_step: Callable[[], None] = lambda: None,
) -> None:
    """Run one batch on this rank; ``jobs`` (rank 0 only) get the tokens and the outcome."""

    def on_tokens(new: list[Optional[int]]) -> None:
        done = None
        if jobs is not None:
            on_step()
            for job, token in zip(jobs, new):
                try:
                    job.feed(token)
                except Exception as error:  # a bug in detokenisation must not desynchronise the ranks
                    logger.exception("output handling failed")
                    job.fail(500, f"output handling failed: {error!r}")
            done = [job.done for job in jobs]
        if all(channel.broadcast_flags(done, len(new))):
            raise _BatchDone

    error = None
    try:
        engine.generate(batch.prompts, batch.config, on_tokens=on_tokens)
    except _BatchDone:
        pass
    except Exception as exc:  # noqa: BLE001 - reported to the clients, the ranks carry on
        error = exc
        logger.error(
            "rank %d: engine failed on a batch of %d:\n%s", channel.rank, len(batch.prompts), traceback.format_exc()
        )
    failed = channel.any(error is not None)
    if jobs is None:
        return
    for job in jobs:
        if failed and job.finish_reason is None and not job.cancelled:
            job.fail(
                500,
                f"the engine failed on this request: {error!r}"
                if error is not None
                else "the engine failed on another rank (see the server log)",
            )
        else:
            job.finish()


def engine_loop(
    engine: InferenceEngine,
    channel: ControlChannel,
    scheduler: Optional[Scheduler],
    eos_id: int,
    pad_id: int,
    stopping: Callable[[], bool],
    on_batch: Callable[[int], None] = lambda size: None,
    on_step: Callable[[], None] = lambda: None,
) -> None:
    """Serve until rank 0 says shutdown. ``scheduler`` only on rank 0."""
    while True:
        jobs: list[Job] = []
        command: object = None
        if scheduler is not None:
            if stopping():
                command = SHUTDOWN
            else:
                jobs = scheduler.next_batch(IDLE_S)
                command = Batch([job.prompt for job in jobs], batch_config(jobs, eos_id, pad_id)) if jobs else IDLE
        command = channel.broadcast(command)
        if command == SHUTDOWN:
            return
        if isinstance(command, Batch):
            if scheduler is not None:
                on_batch(len(jobs))
            run_batch(engine, channel, command, jobs if scheduler is not None else None, on_step)
            if scheduler is not None:
                scheduler.batch_ended(len(jobs))
