"""Rank 0's request loop: jobs come in from the API's threads, tokens go out as events.

MLX work (and so every collective) stays on the one thread that calls `Coordinator.run`.
With two or more pipeline ranks, the answers of concurrent requests are interleaved round the
ring (see `scheduler.py`), ranks in lock step decode them in one batch (`batcher.py`); a lone
rank takes jobs one after another.
"""

from __future__ import annotations

import queue
import time

from launcher.rankspec import DRAFT_TOKENS, PREFILL_CHUNK
from mlxdist.runtime.drafting import PromptLookup, ReplyDrafts
from mlxdist.runtime.runner import InterleavingRunner, StepRunner
from mlxdist.serving.batcher import Batcher, BatchingRunner
from mlxdist.serving.events import Failed, Logits, Stats
from mlxdist.serving.generate import generate_tokens, last_logits
from mlxdist.serving.job import Job
from mlxdist.serving.prefix_cache import PrefixCache, remember
from mlxdist.serving.scheduler import Interleaver
from mlxdist.serving.sequence import Sequence
from mlxdist.serving.speculation import Speculation

# Sequences rank 0 keeps open at once; later requests wait in the queue. At most 30: a control
# vector names the slots that ended as bits of one int32 (slot 0 is kept for jobs run alone).
MAX_SEQUENCES = 16


class Coordinator:
    def __init__(
        self,
        runner: StepRunner,
        tokenizer,
        eos_ids: set[int],
        max_sequences: int = MAX_SEQUENCES,
        prefix: PrefixCache | None = None,
    ):
        self.runner = runner
        self.prefix = prefix  # the prefix cache's index (None: off)
        self._prefill_chunk = PREFILL_CHUNK
        self.speculation = Speculation()
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_sequences = max_sequences
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.scheduler: Interleaver | Batcher | None = None
        if self.interleaves:
            self.scheduler = Interleaver(
                runner, self.jobs, self.sequence, self.run_alone, max_sequences, prefix
            )
        elif runner.size > 1 and isinstance(runner, BatchingRunner):  # ranks in lock step
            self.scheduler = Batcher(
                runner, self.jobs, self.sequence, self.run_alone, max_sequences, prefix
            )

    @property
    def prefill_chunk(self) -> int:
        """Tokens per prefill step: smaller pieces let a pipeline's stages work at once."""
        return self._prefill_chunk

    @prefill_chunk.setter
    def prefill_chunk(self, chunk: int) -> None:
        self._prefill_chunk = chunk
        if self.scheduler is not None:
            self.scheduler.prefill_chunk = chunk

    def speculate(self, mode: str, draft_tokens: int) -> None:
        """Sets speculative decoding: "none", "ngram" (prompt lookup) or "mtp" (R1's MTP layer,
        which the runner must have loaded), drafts per step."""
        self.speculation = Speculation(mode, draft_tokens)
        if self.scheduler is not None:  # an Interleaver or a Batcher: both take the hooks
            self.scheduler.draft_tokens = self.draft_tokens
            self.scheduler.count = self.speculation.count
            self.scheduler.new_drafter = self.new_drafter

    def has_mtp(self) -> bool:
        """Whether the ranks draft with an MTP layer (launched with --speculative mtp)."""
        return getattr(self.runner, "mtp_k", 0) > 0

    @property
    def interleaves(self) -> bool:
        """Whether concurrent answers share the ring (a pipeline of two or more ranks)."""
        return self.runner.size > 1 and isinstance(self.runner, InterleavingRunner)

    @property
    def in_flight_peak(self) -> int:
        """The most steps the ring has held at once, for /mlxdist/stats."""
        return self.scheduler.in_flight_peak if self.scheduler else 0

    def sequence(self, job: Job, slot: int = 0) -> Sequence:
        """A job's answer as it grows, in the given sequence slot."""
        return Sequence(job, self.tokenizer, self.eos_ids, slot)

    def submit(self, job: Job) -> None:
        job.submitted = time.perf_counter()
        self.jobs.put(job)

    def pending(self) -> int:
        """Jobs waiting for a place among the sequences in progress."""
        return self.jobs.qsize()

    def shutdown(self) -> None:
        self.jobs.put(None)

    def run(self) -> None:
        """Serves jobs until shutdown; then stops the other ranks."""
        try:
            if self.scheduler is not None:
                self.scheduler.run()
            else:
                while (job := self.jobs.get()) is not None:
                    if not job.cancelled.is_set():
                        self.run_alone(job)
        finally:
            self.runner.stop()

    def run_alone(self, job: Job) -> None:
        """Runs one job to its end with the ring to itself."""
        try:
            if job.logits:
                job.emit(Logits(last_logits(self.runner, job.prompt).tolist()))
            elif job.stats:
                spec = self.speculation
                figures = spec.figures() if spec.mode != "none" or spec.passes else None
                ranks, prefix = self.runner.stats(), self._prefix_figures()
                job.emit(Stats(ranks, self.in_flight_peak, prefix, speculative=figures))
            else:
                self._generate(job)
        except Exception as e:  # a failed job must not take the loop down with it
            job.emit(Failed(f"{type(e).__name__}: {e}"))

    def _prefix_figures(self) -> dict | None:
        if (prefix := self.prefix) is None:
            return None
        figures = {"entries": len(prefix.entries), "bytes": prefix.nbytes, "budget": prefix.budget}
        figures |= {"hits": prefix.hits, "cached_tokens": prefix.cached_tokens}
        return figures | {"evictions": prefix.evictions}

    def _generate(self, job: Job) -> None:
        seq = self.sequence(job)
        if self.prefix is not None and job.max_tokens > 0:
            seq.source = self.prefix.lookup(job.prompt)
        tokens = generate_tokens(
            self.runner,
            job.prompt,
            job.max_tokens,
            temp=job.temp,
            top_p=job.top_p,
            seed=job.seed,
            eos_ids=seq.eos_ids,
            chunk=self.prefill_chunk,
            src=seq.source.src,
            keep=seq.source.keep,
            draft_tokens=self.draft_tokens(job),
            drafter=self.new_drafter(job),
            fed=seq.fed,
            extras=job.extras_bytes(),
            read=seq.read,
            count=lambda drafted, accepted: (
                self.speculation.count(drafted, accepted),
                seq.count(drafted, accepted),
            ),
        )
        for t in tokens:
            if seq.add(t):
                break
        tokens.close()
        seq.finish()
        if self.prefix is not None and job.max_tokens > 0:
            remember(self.prefix, self.runner, 0, seq.fed)

    def draft_tokens(self, job: Job) -> int:
        """How many drafted tokens job's steps may check (0: no speculation, also where the
        runner cannot check drafts); with the MTP layer, at most the drafts it makes a step."""
        mode = self._mode(job)
        if mode == "none" or job.extras is not None:  # extras: the sampler's state goes one
            return 0  # token at a time (penalties, grammar), so no drafts to check
        k = job.draft_tokens or (
            self.speculation.draft_tokens if mode == self.speculation.mode else DRAFT_TOKENS
        )  # a request's own mode without its own K: that mode's default
        return min(k, self.runner.mtp_k) if mode == "mtp" else k

    def new_drafter(self, job: Job) -> PromptLookup | ReplyDrafts | None:
        """job's drafter: prompt lookup over its prompt, or the MTP layer's replies."""
        mode = self._mode(job)
        if mode == "none":
            return None
        return ReplyDrafts() if mode == "mtp" else PromptLookup(job.prompt)

    def _mode(self, job: Job) -> str:
        if not getattr(self.runner, "verifies", False):
            return "none"
        mode = job.speculative or self.speculation.mode
        return "none" if mode == "mtp" and not self.has_mtp() else mode
