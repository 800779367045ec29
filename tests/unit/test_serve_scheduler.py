"""The server's per-request output (stop strings, held-back text, finish reasons) and batching,
without ranks or HTTP: ids decode to letters (id i -> chr(ord('a') + i)), id 25 is EOS."""

from __future__ import annotations

import asyncio
import threading
import time

from megatron_longvita.inference import GenerationRequest
from megatron_longvita.serve.protocol import Sampling
from megatron_longvita.serve.scheduler import Job, Scheduler

EOS = 25


def decode(ids: list[int]) -> str:
    return "".join(chr(ord("a") + i) for i in ids)


def make_job(
    loop, max_tokens: int = 10, stop: tuple[str, ...] = (), sampling: Sampling = Sampling(0.0), ignore_eos: bool = False
) -> Job:
    return Job(GenerationRequest([1, 2, 3]), max_tokens, sampling, stop, ignore_eos, decode, EOS, loop)


def events(loop, job: Job) -> list[tuple[str, str, str | None]]:
    loop.run_until_complete(asyncio.sleep(0))  # deliver call_soon_threadsafe callbacks
    out = []
    while not job.events.empty():
        event = job.events.get_nowait()
        out.append((event.kind, event.text, event.finish_reason))
    return out


def test_stop_string_is_cut_and_a_possible_prefix_is_held_back() -> None:
    loop = asyncio.new_event_loop()
    job = make_job(loop, stop=("cde",))
    for token in (0, 1, 2, 3):  # "ab", then "c" and "d" may start "cde": held back
        job.feed(token)
    assert "".join(text for _, text, _ in events(loop, job)) == "ab"
    job.feed(4)  # "abcde": stop
    job.feed(5)  # after the stop: ignored
    job.finish()
    assert events(loop, job) == [("done", "", "stop")] and job.text == "ab" and len(job.ids) == 5


def test_held_back_text_that_is_not_a_stop_string_comes_out_and_length_ends_the_row() -> None:
    loop = asyncio.new_event_loop()
    job = make_job(loop, max_tokens=3, stop=("cx",))
    for token in (0, 2, 3):  # "a", "c" held back, then "cd" is no stop: out; 3 tokens = max_tokens
        job.feed(token)
    job.finish()
    got = events(loop, job)
    assert "".join(text for kind, text, _ in got if kind == "text") == "acd" and got[-1] == ("done", "", "length")


def test_eos_ends_the_row_unless_ignored_and_is_counted_not_shown() -> None:
    loop = asyncio.new_event_loop()
    job, ignoring = make_job(loop), make_job(loop, max_tokens=3, ignore_eos=True)
    for token in (0, EOS, 1):
        job.feed(token)
        ignoring.feed(token)
    assert (job.finish_reason, job.ids, job.text) == ("stop", [0, EOS], "a")
    assert (ignoring.finish_reason, ignoring.ids, ignoring.text) == ("length", [0, EOS, 1], "ab")


def test_batches_group_compatible_jobs_and_seeded_jobs_run_alone() -> None:
    loop = asyncio.new_event_loop()
    scheduler = Scheduler(max_batch_size=2, gather_s=0.0)
    greedy = [make_job(loop) for _ in range(3)]
    seeded = make_job(loop, sampling=Sampling(0.7, seed=3))
    sampled = [make_job(loop, sampling=Sampling(0.7)) for _ in range(2)]
    for job in (greedy[0], seeded, greedy[1], sampled[0], greedy[2], sampled[1]):
        scheduler.submit(job)
    greedy[2].cancelled = True
    batches = [scheduler.next_batch(0.01) for _ in range(4)]
    assert batches == [greedy[:2], [seeded], sampled, []]


def test_a_short_batch_waits_for_requests_being_prepared_then_for_the_last_batchs_clients() -> None:
    loop = asyncio.new_event_loop()
    scheduler = Scheduler(max_batch_size=4, gather_s=5.0)
    first, second = make_job(loop), make_job(loop)

    def prepare_and_submit() -> None:
        with scheduler.preparing():
            ready.set()
            time.sleep(0.2)
            scheduler.submit(second)

    ready = threading.Event()
    threading.Thread(target=prepare_and_submit).start()
    ready.wait()
    scheduler.submit(first)
    start = time.monotonic()
    assert scheduler.next_batch(1.0) == [first, second] and time.monotonic() - start < 4.0
    scheduler.batch_ended(2)  # its two clients may come straight back
    third, fourth = make_job(loop), make_job(loop)
    threading.Timer(0.2, scheduler.submit, (fourth,)).start()
    scheduler.submit(third)
    assert scheduler.next_batch(1.0) == [third, fourth]
    scheduler.batch_ended(1)
    alone = make_job(loop)
    scheduler.submit(alone)  # the one client of the last batch is back: no wait
    start = time.monotonic()
    assert scheduler.next_batch(1.0) == [alone] and time.monotonic() - start < 1.0
