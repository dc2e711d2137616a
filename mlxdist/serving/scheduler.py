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

from mlxdist.runtime.pipeline import NEW, SAMPLE, Step
from mlxdist.serving.generate import PREFILL_CHUNK
from mlxdist.serving.sequence import Sequence


class Interleaver:
    def __init__(self, coordinator):
        self.co = coordinator
        self.runner = coordinator.runner
        self.depth = self.runner.size  # steps in flight: one per stage keeps every stage busy
        # Slot 0 stays for jobs run alone (logits), which start it afresh between steps.
        self.free_slots = list(range(coordinator.max_sequences, 0, -1))
        self.ready: deque[Sequence] = deque()  # may take their next step
        self.in_flight: deque[Sequence] = deque()  # wait for a reply, in the order sent
        self.open = 0
        self.stopping = False

    def run(self) -> None:
        while not (self.stopping and self.open == 0):
            self._admit(block=self.open == 0 and not self.stopping)
            try:
                self._launch()
                if self.in_flight:
                    seq = self.in_flight.popleft()
                    self._deliver(seq, self.runner.receive().item())
            except Exception as e:  # the ring is in an unknown state: every open answer fails
                self._fail_all(f"{type(e).__name__}: {e}")

    def _admit(self, block: bool) -> None:
        while self.free_slots and not self.stopping:
            try:
                job = self.co.jobs.get(block=block)
            except queue.Empty:
                return
            block = False
            if job is None:
                self.stopping = True
            elif job.cancelled.is_set():
                continue
            elif job.logits or job.stats:
                self._drain()
                self.co.run_alone(job)
            elif job.max_tokens <= 0:
                Sequence(job, self.co.tokenizer, self.co.eos_ids).finish()
            else:
                seq = Sequence(job, self.co.tokenizer, self.co.eos_ids, self.free_slots.pop())
                self.open += 1
                self.ready.append(seq)

    def _launch(self) -> None:
        """Puts steps into the ring, round robin over the ready sequences, up to the depth."""
        while self.ready and len(self.in_flight) < self.depth:
            seq = self.ready.popleft()
            if seq.job.cancelled.is_set():
                seq.reason = "cancelled"
                self._close(seq)
                continue
            if self._send(seq):
                self.in_flight.append(seq)
                self.co.in_flight_peak = max(self.co.in_flight_peak, len(self.in_flight))
            else:
                self.ready.appendleft(seq)  # a prefill chunk: its next chunk may follow at once

    def _send(self, seq: Sequence) -> bool:
        """Sends the sequence's next step; True when it has a token to come back."""
        job, runner = seq.job, self.runner
        prompt = job.prompt
        if seq.sent < len(prompt) - 1:  # as mlx-lm: all but the last prompt token, in chunks
            chunk = prompt[seq.sent : min(seq.sent + PREFILL_CHUNK, len(prompt) - 1)]
            step = self._step(seq, NEW if seq.sent == 0 else 0)
            seq.sent += len(chunk)
            return runner.send(chunk, step)
        if seq.sent == len(prompt) - 1:
            step = self._step(seq, SAMPLE | (NEW if seq.sent == 0 else 0))
            seq.sent += 1
            return runner.send(prompt[-1:], step)
        return runner.send(seq.tokens[-1:], Step(0, SAMPLE, slot=seq.slot))

    @staticmethod
    def _step(seq: Sequence, flags: int) -> Step:
        job = seq.job
        return Step(0, flags, seed=job.seed, temp=job.temp, top_p=job.top_p, slot=seq.slot)

    def _deliver(self, seq: Sequence, token: int) -> None:
        if seq.add(token):
            self._close(seq)
        else:
            self.ready.append(seq)

    def _close(self, seq: Sequence) -> None:
        seq.finish()
        self.runner.free(seq.slot)
        self.free_slots.append(seq.slot)
        self.open -= 1

    def _drain(self) -> None:
        """Collects every reply still due, so that a job can have the ring to itself."""
        while self.in_flight:
            seq = self.in_flight.popleft()
            self._deliver(seq, self.runner.receive().item())

    def _fail_all(self, message: str) -> None:
        for seq in [*self.in_flight, *self.ready]:
            seq.job.emit("error", message=message)
            self.runner.free(seq.slot)  # its caches, and the links' round, let go of it
            self.free_slots.append(seq.slot)
        self.in_flight.clear()
        self.ready.clear()
        self.runner.replies.clear()
        self.open = 0
