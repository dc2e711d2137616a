"""One request as rank 0's loop sees it: what to generate, and the queue its events go to."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field, replace

from mlxdist.runtime.processors import SamplingExtras
from mlxdist.serving.events import Event


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
    ignore_eos: bool = False  # go on past end-of-sequence tokens to max_tokens
    speculative: str | None = None  # "none" or "ngram" for this request (None: the server's)
    draft_tokens: int | None = None  # drafts per step for this request (None: the server's)
    # logit bias, penalties, a grammar, log probabilities: applied where the sampler runs
    extras: SamplingExtras | None = None
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def extras_bytes(self) -> bytes:
        """The extras as they travel to the sampling rank, with the prompt's tail that the
        penalties count."""
        e = self.extras
        if e is None:
            return b""
        if e.penalised and not e.history:
            e = replace(e, history=self.prompt[-e.context_size :])
        return e.encode()

    def emit(self, event: Event) -> None:
        """Puts event on the job's queue (from any thread, when the job has a loop)."""
        if self.loop is None:
            self.events.put_nowait(event)
        else:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
