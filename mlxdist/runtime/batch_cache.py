"""The KV caches of sequences decoded together, one batch row each, built from and given back to
each sequence's own caches with mlx-lm's batch caches (merge, extend, filter, extract).

A sequence is prefilled alone into its own caches; when it first decodes with others, its caches
are merged in as a new row (left-padded to the longest). When it leaves, its row is filtered out,
and copied out first when its sequence goes on alone (or its cache is kept by the prefix cache).
"""

from __future__ import annotations

import mlx.core as mx


def _merge(caches: list[list]) -> list:
    """One batch cache per layer from several sequences' caches, rows in the order given."""
    return [type(layer[0]).merge(list(layer)) for layer in zip(*caches)]


class Batch:
    """Per layer, one batch cache whose rows are the sequences in `slots`, in that order."""

    def __init__(self):
        self.slots: list[int] = []
        self.caches: list = []

    def __contains__(self, slot: int) -> bool:
        return slot in self.slots

    def __len__(self) -> int:
        return len(self.slots)

    def extract(self, slot: int) -> list:
        """A copy of slot's caches as a lone sequence's; the batch is unchanged."""
        row = self.slots.index(slot)
        return [c.extract(row) for c in self.caches]

    def remove(self, slots: list[int]) -> None:
        """Drops the rows of slots (those present)."""
        rows = [i for i, s in enumerate(self.slots) if s not in slots]
        if len(rows) == len(self.slots):
            return
        self.slots = [self.slots[i] for i in rows]
        if not rows:
            self.caches = []
            return
        for c in self.caches:
            c.filter(rows)

    def form(self, slots: list[int], own: dict[int, list]) -> None:
        """Makes the rows exactly slots: rows not among them go back into own (copied out),
        and slots not yet in are merged in from own (and leave it)."""
        leaving = [s for s in self.slots if s not in slots]
        for s in leaving:
            own[s] = self.extract(s)
        self.remove(leaving)
        joining = [s for s in slots if s not in self.slots]
        if not joining:
            return
        rows = _merge([own.pop(s) for s in joining])
        if self.caches:
            for c, new in zip(self.caches, rows):
                c.extend(new)
        else:
            self.caches = rows
        self.slots += joining

    def order(self, slots: list[int]) -> mx.array:
        """Indices that put values listed in the order of slots into the batch's row order."""
        return mx.array([slots.index(s) for s in self.slots])

    def state(self) -> list:
        return [c.state for c in self.caches]
