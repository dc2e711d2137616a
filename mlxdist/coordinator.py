"""Rank 0's request loop: jobs come in from the API's threads, tokens go out as events.

MLX work (and so every collective) stays on the one thread that calls `Coordinator.run`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from .generate import generate_tokens, last_logits
from .pipeline import Runner
from .stops import StopMatcher


@dataclass
class Job:
    prompt: list[int]
    max_tokens: int
    temp: float = 0.0
    top_p: float = 1.0
    seed: int = -1
    stop: list[str] = field(default_factory=list)
    logits: bool = False  # return the last position's logits instead of generating
    stats: bool = False  # return every rank's traffic counters instead of generating
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def emit(self, kind: str, **data) -> None:
        if self.loop is None:
            self.events.put_nowait((kind, data))
        else:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))


class Coordinator:
    def __init__(self, runner: Runner, tokenizer, eos_ids: set[int]):
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.jobs: queue.Queue[Job | None] = queue.Queue()

    def submit(self, job: Job) -> None:
        job.submitted = time.perf_counter()
        self.jobs.put(job)

    def pending(self) -> int:
        """Jobs waiting for the one in progress to finish."""
        return self.jobs.qsize()

    def shutdown(self) -> None:
        self.jobs.put(None)

    def run(self) -> None:
        """Serves jobs one after another until shutdown; then stops the other ranks."""
        try:
            while (job := self.jobs.get()) is not None:
                if not job.cancelled.is_set():
                    self._run_job(job)
        finally:
            self.runner.stop()

    def _run_job(self, job: Job) -> None:
        try:
            if job.logits:
                job.emit("logits", values=last_logits(self.runner, job.prompt).tolist())
                return
            if job.stats:
                job.emit("stats", ranks=self.runner.stats())
                return
            self._generate(job)
        except Exception as e:  # a failed job must not take the loop down with it
            job.emit("error", message=f"{type(e).__name__}: {e}")

    def _generate(self, job: Job) -> None:
        detok = self.tokenizer.detokenizer
        detok.reset()
        stops = StopMatcher(job.stop)
        start = time.perf_counter()
        first = None
        tokens: list[int] = []
        reason = "length"
        for t in generate_tokens(
            self.runner,
            job.prompt,
            job.max_tokens,
            temp=job.temp,
            top_p=job.top_p,
            seed=job.seed,
            eos_ids=self.eos_ids,
        ):
            if first is None:
                first = time.perf_counter()
            if t in self.eos_ids:
                reason = "stop"
                break
            tokens.append(t)
            detok.add_token(t)
            job.emit("token", id=t, text=stops.feed(detok.last_segment))
            if stops.stopped:
                reason = "stop"
                break
            if job.cancelled.is_set():
                reason = "cancelled"
                break
        detok.finalize()
        tail = "" if stops.stopped else stops.feed(detok.last_segment) + stops.finish()
        end = time.perf_counter()
        decode_time = end - (first or end)
        job.emit(
            "done",
            text=tail,
            finish_reason=reason,
            tokens=tokens,
            prompt_tokens=len(job.prompt),
            completion_tokens=len(tokens),
            queue_time=start - job.submitted,
            time_to_first_token=(first or end) - job.submitted,
            decode_tokens_per_second=(len(tokens) - 1) / decode_time if decode_time > 0 else 0.0,
        )
