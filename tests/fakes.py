"""Runners that compute made-up tokens in-process, for the coordinator's and the API's fast tests.

Each sequence slot keeps its history like a KV cache: a step with NEW starts it afresh, every step
appends its tokens, and a sampled reply is `next_token(history, seed)`. So an answer
depends only on its own prompt and tokens, and a step sent to the wrong slot changes it. Every
step is recorded. Their size is 2 or more: a lone rank's decode drives a real stage directly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import mlx.core as mx

from mlxdist.runtime.runner import InterleavingRunner, StepRunner
from mlxdist.runtime.step import LOGITS, NEW, SAMPLE, Step

LOW, SPAN = 300, 500  # made-up tokens are ids LOW..LOW+SPAN-1 (whole words in tiny-r1's vocab)
LOGITS_SIZE = 8


def next_token(history: list[int], seed: int = -1) -> int:
    """The made-up model: a token from the whole history (and the seed, when sampling)."""
    h = 17
    for t in history:
        h = (h * 1_000_003 + t + 1) % 2**31
    return LOW + (h + max(seed, 0) * 7919) % SPAN


def answer(prompt: list[int], n: int, seed: int = -1) -> list[int]:
    """The n tokens a fake runner answers prompt with, ignoring eos and stops (seed: a sampled
    request's; greedy ones have none)."""
    history, out = list(prompt), []
    for _ in range(n):
        out.append(next_token(history, seed))
        history.append(out[-1])
    return out


@dataclass
class Sent:
    """One step a fake runner was given."""

    tokens: list[int]
    step: Step


@dataclass
class _Slot:
    history: list[int]
    seed: int


class FakeLockstep(StepRunner):
    """A runner that takes whole steps only, as ranks in lock step do.

    before_send(runner, tokens, step) runs before each step is taken (it may raise, to fail it)."""

    def __init__(self, size: int = 2, before_send: Callable | None = None):
        assert size > 1, "a lone rank's decode needs a real stage"
        self.size = size
        self.stage = None
        self.cache: list = []
        self.sampler = None
        self.before_send = before_send
        self.slots: dict[int, _Slot] = {}
        self.sent: list[Sent] = []
        self.stopped = False

    def _take(self, tokens: list[int], step: Step) -> mx.array | None:
        if self.before_send is not None:
            self.before_send(self, tokens, step)
        self.sent.append(Sent(list(tokens), replace(step)))
        if step.flags & NEW or step.slot not in self.slots:
            sampled = step.temp > 0
            self.slots[step.slot] = _Slot([], step.seed if sampled else -1)
        slot = self.slots[step.slot]
        slot.history += tokens
        if step.flags & LOGITS:
            h = next_token(slot.history)
            return mx.array([float((h * (i + 1)) % 13) for i in range(LOGITS_SIZE)])
        if not step.flags & SAMPLE:
            return None
        return mx.array([next_token(slot.history, slot.seed)], mx.int32)

    def step(self, tokens: list[int], step: Step) -> mx.array | None:
        return self._take(tokens, step)

    def stop(self) -> None:
        self.stopped = True

    def stats(self) -> list[dict]:
        return [{"rank": r, "steps": len(self.sent) if r == 0 else 0} for r in range(self.size)]

    def steps_of(self, slot: int) -> list[Sent]:
        return [s for s in self.sent if s.step.slot == slot]


class FakeRunner(FakeLockstep, InterleavingRunner):
    """A pipeline-like runner: steps of several slots in flight at once, replies in order."""

    def __init__(self, size: int = 2, before_send: Callable | None = None):
        super().__init__(size, before_send)
        self.replies: deque = deque()  # the replies still due, oldest first
        self.freed: list[int] = []

    def send(self, tokens: list[int], step: Step) -> bool:
        out = self._take(tokens, step)
        if out is not None:
            self.replies.append(out)
        return out is not None

    def receive(self) -> mx.array:
        return self.replies.popleft()

    def step(self, tokens: list[int], step: Step) -> mx.array | None:
        return self.receive() if self.send(tokens, step) else None

    def free(self, slot: int) -> None:
        self.freed.append(slot)
        self.slots.pop(slot, None)


class FakeTokenizer:
    """Token t reads "<t>"; enough of a tokenizer for Sequence."""

    @property
    def detokenizer(self) -> FakeDetokenizer:
        return FakeDetokenizer()


class FakeDetokenizer:
    def __init__(self) -> None:
        self._new = ""

    def add_token(self, t: int) -> None:
        self._new += f"<{t}>"

    def finalize(self) -> None:
        pass

    @property
    def last_segment(self) -> str:
        new, self._new = self._new, ""
        return new
