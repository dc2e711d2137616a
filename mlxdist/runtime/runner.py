"""What rank 0's serving needs of a runner, whichever way the ranks share the model.

Every runner takes whole steps (`StepRunner`). A pipeline of ranks also lets rank 0 put steps
of several sequences into the ring before their replies come back (`InterleavingRunner`), so
concurrent answers share it; serving asks `isinstance(runner, InterleavingRunner)`.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol, runtime_checkable

import mlx.core as mx

from mlxdist.runtime.sampling import Sampler
from mlxdist.runtime.stage import Stage
from mlxdist.runtime.step import Step


@runtime_checkable
class StepRunner(Protocol):
    """Rank 0's side of any runner: one step at a time through every rank."""

    size: int  # ranks in the group
    stage: Stage
    # Slot 0's KV cache and sampler: a lone rank's decode drives its stage with them directly.
    cache: list
    sampler: Sampler

    def step(self, tokens: list[int], step: Step) -> mx.array | None:
        """Runs one step on every rank; returns its reply (a token id or logits), if any."""
        ...

    def stop(self) -> None:
        """Tells every other rank to leave its loop."""
        ...

    def stats(self) -> list[dict]:
        """Every rank's traffic, steps, peak memory and open caches."""
        ...


@runtime_checkable
class InterleavingRunner(StepRunner, Protocol):
    """A runner whose steps of different sequences (slots) may be in flight at once."""

    replies: deque  # the steps whose reply is still due, in the order sent

    def send(self, tokens: list[int], step: Step) -> bool:
        """Puts a step in; True when it has a reply for `receive` to collect."""
        ...

    def receive(self) -> mx.array:
        """The reply of the oldest step still due."""
        ...

    def free(self, slot: int) -> None:
        """Every rank drops the KV cache of a finished sequence."""
        ...
