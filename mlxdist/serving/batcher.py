"""Continuous batching for ranks in lock step (expert and tensor parallelism).

Every rank runs every layer, so a step of one sequence keeps them all busy, but a decode step
of one token is mostly waiting on collectives and per-step overhead. Here the next tokens of
all open answers go through the ranks in one decode step (one forward pass, one round of
collectives for all of them). Requests join and leave between steps: a joining request's prompt
is fed alone, one step of it per round, into its own KV cache, then it decodes with the others.
Each sequence keeps its own cache row and sampler, so batching changes no greedy answer.

A sequence whose job speculates (prompt lookup or the MTP layer) takes steps of its own while it
decodes alone: its last token and its drafts in one VERIFY step, whose reply is the drafts the
model accepts and the token after them; its next step drops the rejected drafts' positions from
every rank's caches. With other sequences decoding it joins their batch (after one step of its
own that drops its rejected drafts), since one batched step serves them all for one round of
collectives where a speculative pass each would cost a round each.
"""

from __future__ import annotations

import queue
from collections import deque
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import mlx.core as mx

from launcher.rankspec import PREFILL_CHUNK
from mlxdist.runtime.drafting import PromptLookup
from mlxdist.runtime.runner import StepRunner
from mlxdist.runtime.speculative import read_reply
from mlxdist.runtime.step import DRAFT, EXTRAS, NEW, SAMPLE, VERIFY, Step
from mlxdist.serving.events import Failed
from mlxdist.serving.job import Job
from mlxdist.serving.prefix_cache import PrefixCache, remember
from mlxdist.serving.schedule import prefill_steps
from mlxdist.serving.sequence import Sequence


@runtime_checkable
class BatchingRunner(StepRunner, Protocol):
    """A runner that decodes several sequences (slots) in one step."""

    def decode(self, slots: list[int], tokens: list[int]) -> mx.array:
        """One decode step of the sequences in slots (ascending), each fed its token; their
        sampled tokens in the same order."""
        ...

    def free(self, slot: int) -> None:
        """Every rank drops the KV cache of a finished sequence."""
        ...


class Batcher:
    """Takes jobs from `jobs` (None: stop once every open answer is done) and answers them.

    new_sequence(job, slot) makes a job's Sequence; run_alone(job) runs a job (logits, stats)
    with the ranks to itself, between steps."""

    def __init__(
        self,
        runner: BatchingRunner,
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
        # Slot 0 stays for jobs run alone (logits), which start it afresh between steps.
        self.free_slots = list(range(max_sequences, 0, -1))
        self.joining: deque[Sequence] = deque()  # their prompt still to feed, oldest first
        self.decoding: dict[int, Sequence] = {}  # slot -> sequence with a token to feed
        self.in_flight_peak = 0  # most sequences decoded in one step, for /mlxdist/stats
        self.stopping = False
        self.prefix = prefix  # the prefix cache's index, or None
        self.prefill_chunk = PREFILL_CHUNK
        # job -> tokens prompt lookup may draft per step (0: none); (drafted, accepted) -> None
        self.draft_tokens: Callable[[Job], int] = lambda job: 0
        self.count: Callable[[int, int], None] = lambda drafted, accepted: None
        # job -> its drafter, made when its prompt starts (it sees every token from there)
        self.new_drafter: Callable[[Job], object] = lambda job: PromptLookup(job.prompt)

    @property
    def open(self) -> int:
        return len(self.joining) + len(self.decoding)

    def run(self) -> None:
        while not (self.stopping and self.open == 0):
            try:
                self._admit(block=self.open == 0 and not self.stopping)
                self._prefill()
                self._decode()
            except Exception as e:  # the ranks are in an unknown state: every open answer fails
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
                self.run_alone(job)  # nothing is in flight between steps
            elif job.max_tokens <= 0:
                self.new_sequence(job, 0).finish()
            else:
                self.joining.append(self.new_sequence(job, self.free_slots.pop()))

    def _prefill(self) -> None:
        """Feeds each joining sequence its next prompt step; the last samples its first token."""
        for seq in list(self.joining):
            job = seq.job
            if job.cancelled.is_set():
                self.joining.remove(seq)
                seq.reason = "cancelled"
                self._close(seq)
                continue
            if seq.prefill is None:  # its first step: where its caches start
                self._start(seq)
            tokens, flags = seq.prefill.popleft()
            src, keep = (seq.source.src, seq.source.keep) if flags & NEW else (0, 0)
            sampling = {"seed": job.seed, "temp": job.temp, "top_p": job.top_p}
            flags |= _draft_flag(seq)
            if flags & NEW and job.extras is not None:
                flags, sampling["extras"] = flags | EXTRAS, job.extras_bytes()
            step = Step(0, flags, slot=seq.slot, src=src, keep=keep, **sampling)
            out = self.runner.step(tokens, step)  # it stays listed if this raises
            seq.fed += tokens
            if not seq.prefill:
                self.joining.remove(seq)
                self.decoding[seq.slot] = seq
                self._deliver(seq, _read(seq, out, flags, len(tokens)))

    def _start(self, seq: Sequence) -> None:
        """The prompt's steps, after the longest prefix the prefix cache holds (of a kept entry
        or of an open sequence's caches, which every rank holds as they are now)."""
        prompt = seq.job.prompt
        if self.prefix is not None:
            running = {s.slot: s.fed for s in [*self.joining, *self.decoding.values()] if s.fed}
            seq.source = self.prefix.lookup(prompt, running)
        keep = seq.source.keep
        seq.prefill = deque(prefill_steps(prompt[keep:], chunk=self.prefill_chunk))
        seq.fed = list(prompt[:keep])
        if self.draft_tokens(seq.job) > 0:
            seq.drafter = self.new_drafter(seq.job)

    def _decode(self) -> None:
        """One decode step of every sequence that has its first token: those that speculate
        (or must drop rejected drafts first) one step each, the others in one batch."""
        for seq in [s for s in self.decoding.values() if s.job.cancelled.is_set()]:
            seq.reason = "cancelled"
            self._close(seq)
        # Speculation pays only for a sequence decoding alone: with others, one batched step
        # serves them all for one round of collectives, where a pass each costs one round each.
        drafting = len(self.decoding) == 1
        alone = [
            s for s in self.decoding.values() if s.trim or (s.drafter is not None and drafting)
        ]
        slots = sorted(s for s in self.decoding if self.decoding[s] not in alone)
        for slot in slots:  # drafts made before it joined the batch are stale by the time it leaves
            drafter = self.decoding[slot].drafter
            if drafter is not None and drafter.remote:
                drafter.offer([])
        if slots:
            feed = [self.decoding[s].tokens[-1] for s in slots]
            out = self.runner.decode(slots, feed)
            self.in_flight_peak = max(self.in_flight_peak, len(slots))
            # rows of replies when a sequence has sampling extras (its log probabilities)
            rows = (out if out.ndim == 2 else out.reshape(-1, 1)).tolist()
            for slot, t, row in zip(slots, feed, rows):
                seq = self.decoding[slot]
                seq.fed.append(t)
                seq.read(row)
                self._deliver(seq, row[:1])
        for seq in alone:
            self._speculate(seq, drafting)

    def _speculate(self, seq: Sequence, drafting: bool) -> None:
        """One step of the sequence alone: its last token and, when it decodes alone, its
        drafter's drafts (else the step only drops its rejected drafts, then it joins the
        batch: the drafts this step's reply brings are dropped with the others')."""
        drafts = self._drafts(seq) if drafting else []
        tokens = [seq.tokens[-1], *drafts]
        flags = SAMPLE | (VERIFY if drafts else 0) | _draft_flag(seq)
        out = self.runner.step(tokens, Step(0, flags, slot=seq.slot, trim=seq.trim))
        seq.trim, seq.drafted = 0, len(drafts)  # it stays listed if the step raised
        seq.fed += tokens
        self._deliver(seq, _read(seq, out, flags, len(tokens)))

    def _drafts(self, seq: Sequence) -> list[int]:
        """The drafter's drafts for the sequence's next step: no more than the answer still has
        room for after the step's own token."""
        if seq.drafter is None:
            return []
        k = self.draft_tokens(seq.job)
        return seq.drafter.draft(min(k, seq.job.max_tokens - len(seq.tokens) - 1))

    def _deliver(self, seq: Sequence, tokens: list[int]) -> None:
        """A step's tokens for the sequence: one, or a VERIFY step's accepted drafts and the
        token after them (the rejected drafts leave seq.fed now, its caches at its next step)."""
        seq.settle(tokens, self.count)
        if seq.take(tokens):
            self._close(seq)

    def _close(self, seq: Sequence) -> None:
        seq.finish()
        if self.prefix is not None:  # its caches hold seq.fed on every rank
            remember(self.prefix, self.runner, seq.slot, seq.fed)
        self.decoding.pop(seq.slot, None)
        self.runner.free(seq.slot)
        self.free_slots.append(seq.slot)

    def _fail_all(self, message: str) -> None:
        for seq in [*self.joining, *self.decoding.values()]:
            seq.job.emit(Failed(message))
            self.runner.free(seq.slot)  # its caches let go of it
            self.free_slots.append(seq.slot)
        self.joining.clear()
        self.decoding.clear()


def _draft_flag(seq: Sequence) -> int:
    """DRAFT for the steps of a sequence the MTP layer drafts for (rank 0 feeds it every step)."""
    return DRAFT if seq.drafter is not None and seq.drafter.remote else 0


def _read(seq: Sequence, out: mx.array, flags: int, length: int) -> list[int]:
    """A step's tokens; the MTP layer's drafts that follow them go to the sequence's drafter."""
    tokens, drafts = read_reply(out, flags, length)
    seq.read(out)
    if flags & DRAFT:
        seq.drafter.offer(drafts)
    return tokens
