"""Continuous batching across pipeline stages: several answers in the ring at once.

A single answer keeps one rank busy at a time: the others wait for its hidden state. Here rank 0
puts the next step of another sequence into the ring as soon as it has run its own layers, up
to one step in flight per rank, so with several streams every stage works at once. Requests join
and leave between steps. Each sequence is computed exactly as it would be alone (its own KV cache
and sampler on every rank), so interleaving changes no answer.
"""

from __future__ import annotations

import queue
from collections import deque
from collections.abc import Callable

from launcher.rankspec import PREFILL_CHUNK
from mlxdist.runtime.drafting import PromptLookup
from mlxdist.runtime.runner import InterleavingRunner
from mlxdist.runtime.speculative import read_reply
from mlxdist.runtime.step import DRAFT, EXTRAS, NEW, SAMPLE, VERIFY, Step
from mlxdist.serving.events import Failed
from mlxdist.serving.job import Job
from mlxdist.serving.prefix_cache import PrefixCache, remember
from mlxdist.serving.schedule import prefill_steps
from mlxdist.serving.sequence import Sequence


class Interleaver:
    """Takes jobs from `jobs` (None: stop once every open answer is done) and answers them.

    new_sequence(job, slot) makes a job's Sequence; run_alone(job) runs a job (logits, stats)
    with the ring to itself, between steps."""

    def __init__(
        self,
        runner: InterleavingRunner,
        jobs: queue.Queue[Job | None],
        new_sequence: Callable[[Job, int], Sequence],
        run_alone: Callable[[Job], None],
        max_sequences: int,
        prefix: PrefixCache | None = None,
    ):
        self.runner = runner
        self.jobs = jobs
        self.new_sequence = new_sequence
        self.run_alone = run_alone
        self.depth = runner.size  # steps in flight: one per stage keeps every stage busy
        # Slot 0 stays for jobs run alone (logits), which start it afresh between steps.
        self.free_slots = list(range(max_sequences, 0, -1))
        self.ready: deque[Sequence] = deque()  # may take their next step
        self.in_flight: deque[Sequence] = deque()  # wait for a reply, in the order sent
        self.in_flight_peak = 0  # most steps in the ring at once, for /mlxdist/stats
        self.open = 0
        self.stopping = False
        self.prefix = prefix  # the prefix cache's index, or None
        self.prefill_chunk = PREFILL_CHUNK
        # job -> tokens prompt lookup may draft per step (0: none); (drafted, accepted) -> None
        self.draft_tokens: Callable[[Job], int] = lambda job: 0
        self.count: Callable[[int, int], None] = lambda drafted, accepted: None
        # job -> its drafter (prompt lookup, or the MTP layer's drafts that come with replies)
        self.new_drafter: Callable[[Job], object] = lambda job: PromptLookup(job.prompt)

    def run(self) -> None:
        while not (self.stopping and self.open == 0):
            try:
                self._admit(block=self.open == 0 and not self.stopping)  # may drain the ring
                self._launch()
                if self.in_flight:
                    self._deliver_oldest()
            except Exception as e:  # the ring is in an unknown state: every open answer fails
                self._fail_all(f"{type(e).__name__}: {e}")

    def _admit(self, block: bool) -> None:
        while self.free_slots and not self.stopping:
            try:
                job = self.jobs.get(block=block)
            except queue.Empty:
                return
            block = False
            if job is None:
                self.stopping = True
            elif job.cancelled.is_set():
                continue
            elif job.logits or job.stats:
                try:
                    self._drain()
                except Exception as e:  # this job is off the queue: it fails with the others
                    job.emit(Failed(f"{type(e).__name__}: {e}"))
                    raise
                self.run_alone(job)
            elif job.max_tokens <= 0:
                self.new_sequence(job, 0).finish()
            else:
                seq = self.new_sequence(job, self.free_slots.pop())
                self.open += 1
                self.ready.append(seq)

    def _launch(self) -> None:
        """Puts steps into the ring, round robin over the ready sequences, up to the depth."""
        while self.ready and len(self.in_flight) < self.depth:
            seq = self.ready[0]  # stays listed until sent: a step that raises fails it too
            if seq.job.cancelled.is_set():
                self.ready.popleft()
                seq.reason = "cancelled"
                self._close(seq)
                continue
            if self._send(seq):
                self.in_flight.append(self.ready.popleft())
                self.in_flight_peak = max(self.in_flight_peak, len(self.in_flight))
            # else a prefill chunk: the sequence's next chunk may follow at once

    def _send(self, seq: Sequence) -> bool:
        """Sends the sequence's next step; True when it has a token to come back."""
        job = seq.job
        if seq.prefill is None:
            if self.prefix is not None:
                seq.source = self.prefix.lookup(job.prompt, self._running())
            keep = seq.source.keep
            seq.prefill = deque(prefill_steps(job.prompt[keep:], chunk=self.prefill_chunk))
            seq.fed = list(job.prompt[:keep])
            if self.draft_tokens(job) > 0:
                seq.drafter = self.new_drafter(job)
        extra = DRAFT if seq.drafter is not None and seq.drafter.remote else 0
        if seq.prefill:
            tokens, flags = seq.prefill.popleft()
            src, keep = (seq.source.src, seq.source.keep) if flags & NEW else (0, 0)
            sampling = {"seed": job.seed, "temp": job.temp, "top_p": job.top_p}
            if flags & NEW and job.extras is not None:
                flags, sampling["extras"] = flags | EXTRAS, job.extras_bytes()
            step = Step(0, flags | extra, slot=seq.slot, src=src, keep=keep, **sampling)
            seq.fed += tokens
            seq.sent = (step.flags, len(tokens))
            return self.runner.send(tokens, step)
        drafts = self._drafts(seq)
        tokens = [seq.tokens[-1], *drafts]
        flags = SAMPLE | (VERIFY if drafts else 0) | extra
        step = Step(0, flags, slot=seq.slot, trim=seq.trim)
        seq.trim, seq.drafted, seq.sent = 0, len(drafts), (flags, len(tokens))
        seq.fed += tokens
        return self.runner.send(tokens, step)

    def _drafts(self, seq: Sequence) -> list[int]:
        """The drafter's drafts for the sequence's next step, when speculation is on: no more
        than the answer still has room for after the step's own token."""
        if seq.drafter is None:
            return []
        k = self.draft_tokens(seq.job)
        return seq.drafter.draft(min(k, seq.job.max_tokens - len(seq.tokens) - 1))

    def _running(self) -> dict[int, list[int]]:
        """Open sequences' slots and the tokens their caches hold: a new prompt may start from
        one (every rank copies it after the steps already sent, so all copy the same)."""
        return {s.slot: s.fed for s in [*self.ready, *self.in_flight] if s.fed}

    def _deliver_oldest(self) -> None:
        out = self.runner.receive()  # its sequence stays listed if this raises
        seq = self.in_flight[0]
        tokens, following = read_reply(out, *seq.sent)
        seq.read(out)
        if seq.sent[0] & DRAFT:
            seq.drafter.offer(following)
        self._deliver(self.in_flight.popleft(), tokens)

    def _deliver(self, seq: Sequence, tokens: list[int]) -> None:
        seq.settle(tokens, self.count)  # a VERIFY step's rejected drafts leave the caches
        if seq.take(tokens):
            self._close(seq)
        else:
            self.ready.append(seq)

    def _close(self, seq: Sequence) -> None:
        seq.finish()
        if self.prefix is not None:  # every step it sent has come back: its caches are whole
            remember(self.prefix, self.runner, seq.slot, seq.fed)
        self.runner.free(seq.slot)
        self.free_slots.append(seq.slot)
        self.open -= 1

    def _drain(self) -> None:
        """Collects every reply still due, so that a job can have the ring to itself."""
        while self.in_flight:
            self._deliver_oldest()

    def _fail_all(self, message: str) -> None:
        for seq in [*self.in_flight, *self.ready]:
            seq.job.emit(Failed(message))
            self.runner.free(seq.slot)  # its caches, and the links' round, let go of it
            self.free_slots.append(seq.slot)
        self.in_flight.clear()
        self.ready.clear()
        self.runner.replies.clear()
        self.open = 0
