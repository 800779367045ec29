"""The request queue and batcher, and each request's output as tokens arrive (rank 0 only).

HTTP handlers (asyncio thread) submit :class:`Job` s; the engine loop (main thread) takes a
batch at each batch boundary: the oldest waiting job and every later one that can share its
sampler (same temperature / top-k / top-p and EOS handling; a job with an explicit seed runs
alone, so that its draws do not depend on its neighbours), up to ``max_batch_size``. The batch
runs to its longest ``max_tokens``; a row that is done (its own limit, a stop string, a
cancelled or disconnected client) stops being reported, and the batch ends once every row is.
Events go back to the handler's event loop through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Optional

from megatron_longvita.inference import GenerationRequest
from megatron_longvita.serve.protocol import Sampling


@dataclass
class Event:
    kind: str  # "text" (a delta), "done", "error"
    text: str = ""
    finish_reason: Optional[str] = None  # "stop" | "length", with "done"
    status: int = 200  # with "error"


class Job:
    """One request's generation; token handling runs on the engine thread."""

    def __init__(
        self,
        prompt: GenerationRequest,
        max_tokens: int,
        sampling: Sampling,
        stop: tuple[str, ...],
        ignore_eos: bool,
        decode: Callable[[list[int]], str],
        eos_id: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.prompt, self.max_tokens, self.sampling, self.stop = prompt, max_tokens, sampling, stop
        self.ignore_eos, self.decode, self.eos_id = ignore_eos, decode, eos_id
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.ids: list[int] = []
        self.text = ""  # decoded so far (stop strings cut)
        self.sent = 0  # characters of text already sent
        self.finish_reason: Optional[str] = None
        self.stop_cut = False  # the text ends at a stop string
        self.cancelled = False  # set from the asyncio thread; read by the engine thread
        self.submitted = time.monotonic()
        self.first_token_s: Optional[float] = None
        self.settled = False  # accounted for by the HTTP side

    @property
    def batch_key(self) -> tuple:
        s = self.sampling
        if s.temperature == 0:  # greedy: the sampler's other settings do not matter
            return ("greedy", self.ignore_eos)
        if s.seed is not None:  # runs alone
            return ("seeded", id(self))
        return (s.temperature, s.top_k, s.top_p, self.ignore_eos)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def _emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def feed(self, token: Optional[int]) -> None:
        """The engine's next id for this row (None: the engine stopped the row at EOS)."""
        if self.done:
            return
        if token is None:
            self.finish_reason = "stop"
            return
        if self.first_token_s is None:
            self.first_token_s = time.monotonic() - self.submitted
        self.ids.append(token)
        if token == self.eos_id and not self.ignore_eos:
            self.finish_reason = "stop"
            return
        text = self._decoded()
        cut = min((i for i in (text.find(s, max(self.sent - len(s), 0)) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.finish_reason, self.stop_cut = text[:cut], "stop", True
        elif len(self.ids) >= self.max_tokens:
            self.finish_reason = "length"
        if self.finish_reason is None and text.endswith("\ufffd"):
            text = self.text  # the rest of a multi-byte character may still come
        self.text = text
        self._send_text(final=self.finish_reason is not None)

    def _decoded(self) -> str:
        return self.decode([t for t in self.ids if t != self.eos_id])

    def _send_text(self, final: bool) -> None:
        # hold back a tail that may still grow into a stop string
        held = (
            0
            if final
            else max((k for s in self.stop for k in range(len(s) - 1, 0, -1) if self.text.endswith(s[:k])), default=0)
        )
        end = len(self.text) - held
        if end > self.sent:
            self._emit(Event("text", self.text[self.sent : end]))
            self.sent = end

    def finish(self) -> None:
        """After the batch: the rest of the text and the finish reason (unless cancelled)."""
        if self.cancelled or self.finish_reason == "error":
            return
        self.finish_reason = self.finish_reason or "length"
        if not self.stop_cut:  # a character held back as incomplete is final now
            self.text = self._decoded()
        self._send_text(final=True)
        self._emit(Event("done", finish_reason=self.finish_reason))

    def fail(self, status: int, message: str) -> None:
        self.finish_reason = self.finish_reason or "error"
        self._emit(Event("error", message, status=status))


@dataclass
class Scheduler:
    max_batch_size: int = 8
    gather_s: float = 0.1  # how long a short batch waits for requests already being prepared
    _waiting: collections.deque = field(default_factory=collections.deque)
    _ready: threading.Condition = field(default_factory=threading.Condition)
    _preparing: int = 0
    _last_batch_size: int = 0  # the clients of the batch that just ended, who may come straight back
    _submitted_since: int = 0  # jobs submitted since that batch ended
    closed: bool = False

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Around a request's parsing and prompt building: a batch about to start waits for it."""
        with self._ready:
            self._preparing += 1
        try:
            yield
        finally:
            with self._ready:
                self._preparing -= 1
                self._ready.notify_all()

    def submit(self, job: Job) -> None:
        with self._ready:
            if self.closed:
                raise RuntimeError("the server is shutting down")
            self._waiting.append(job)
            self._submitted_since += 1
            self._ready.notify_all()

    def batch_ended(self, size: int) -> None:
        with self._ready:
            self._last_batch_size, self._submitted_since = size, 0

    def __len__(self) -> int:
        return len(self._waiting)

    def next_batch(self, timeout: float) -> list[Job]:
        """The next batch, or [] after ``timeout`` seconds without work (cancelled jobs dropped)."""
        with self._ready:
            self._ready.wait_for(lambda: self._waiting or self.closed, timeout)
            self._waiting = collections.deque(job for job in self._waiting if not job.cancelled)
            if not self._waiting:
                return []
            key = self._waiting[0].batch_key
            # Closed-loop clients (evaluation harnesses) send their next request as soon as the
            # last one is answered: a short batch waits briefly for requests already being
            # prepared and for the clients of the batch that just ended, instead of settling
            # into two half batches that alternate.
            deadline = time.monotonic() + self.gather_s
            while (
                (self._preparing or self._submitted_since < self._last_batch_size)
                and not self.closed
                and time.monotonic() < deadline
                and sum(job.batch_key == key for job in self._waiting) < self.max_batch_size
            ):
                self._ready.wait(deadline - time.monotonic())
            batch, rest = [], collections.deque()
            for job in self._waiting:
                (
                    batch if job.batch_key == key and len(batch) < self.max_batch_size and not job.cancelled else rest
                ).append(job)
            self._waiting = collections.deque(job for job in rest if not job.cancelled)
            return batch

    def close(self) -> list[Job]:
        """Refuse new jobs; returns the waiting ones (to be failed)."""
        with self._ready:
            self.closed = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._ready.notify_all()
            return waiting
