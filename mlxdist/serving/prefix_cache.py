"""Rank 0's index of the prefix cache: which token sequences every rank holds KV caches for, the
longest one a new prompt starts with, and what to drop to stay within the byte budget.

Pure bookkeeping: the runner keeps and drops the caches themselves, on every rank alike
(mlxdist/runtime/prefix_store.py). Entries are matched by a vectorised comparison against each
entry (numpy, a few microseconds per thousand tokens), which at the hundreds of entries a budget
holds costs less than a trie's per-token Python nodes would to build.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# can_cut(length, keep): whether caches holding `length` positions can be cut to their first
# `keep` (full caches can; a wrapped sliding window or a recurrent state only whole).
CanCut = Callable[[int, int], bool]


@dataclass
class Entry:
    tokens: np.ndarray
    nbytes: int  # on the rank that holds the most of it
    used: int  # when last matched or kept, on the index's clock


@dataclass(frozen=True)
class Match:
    src: int  # a kept entry (> 0), a running slot (< 0, as -slot), or 0: none
    keep: int  # the prompt's first positions its caches hold


NO_MATCH = Match(0, 0)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class PrefixCache:
    """budget: bytes the entries may hold on any one rank (0: keep nothing). scale: the bytes a
    rank holds at most for an entry over the bytes rank 0 holds (a pipeline's stages differ)."""

    def __init__(self, budget: int, can_cut: CanCut, scale: float = 1.0):
        self.budget = budget
        self.can_cut = can_cut
        self.scale = scale
        self.entries: dict[int, Entry] = {}
        self.next_id = 1
        self.clock = 0
        self.lookups = 0  # requests looked up
        self.hits = 0  # requests that started from a cached prefix
        self.cached_tokens = 0  # prompt tokens they did not compute
        self.evictions = 0  # entries dropped to stay within the budget
        self.per_token = 0.0  # bytes per token the last entry kept took, for estimates

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def _usable(self, length: int, shared: int, prompt_len: int) -> int:
        """The positions of a source of `length` a prompt can start from (it must compute at
        least its last token itself, for the logits that sample the answer)."""
        keep = min(shared, length, prompt_len - 1)
        if keep <= 0:
            return 0
        if self.can_cut(length, keep):
            return keep
        return 0

    def lookup(self, prompt: Sequence[int], running: Mapping[int, Sequence[int]] = {}) -> Match:
        """The source holding the longest usable prefix of prompt: a kept entry, or a running
        sequence (slot -> the tokens its caches hold)."""
        if self.budget <= 0 or len(prompt) < 2:
            return NO_MATCH
        self.lookups += 1
        p = np.asarray(prompt, dtype=np.int64)
        best, best_keep = NO_MATCH, 0
        sources = [(i, e.tokens) for i, e in self.entries.items()]
        sources += [(-slot, np.asarray(t, dtype=np.int64)) for slot, t in running.items()]
        for src, tokens in sources:
            keep = self._usable(len(tokens), common_prefix(tokens, p), len(p))
            if keep > best_keep or (keep == best_keep and keep and src > 0 > best.src):
                best, best_keep = Match(src, keep), keep
        if best.src > 0:
            self.clock += 1
            self.entries[best.src].used = self.clock
        if best.keep:
            self.hits += 1
            self.cached_tokens += best.keep
        return best

    def admit(self, tokens: Sequence[int]) -> int | None:
        """The id to keep a finished sequence's caches under, or None when they are not worth
        keeping: the cache is off, or a kept entry already holds them (it is used instead)."""
        if self.budget <= 0 or len(tokens) < 2:
            return None
        t = np.asarray(tokens, dtype=np.int64)
        for e in self.entries.values():
            shared = common_prefix(e.tokens, t)
            if shared == len(t) and self.can_cut(len(e.tokens), len(t)):
                self.clock += 1
                e.used = self.clock
                return None
        entry, self.next_id = self.next_id, self.next_id + 1
        return entry

    def make_room(self, length: int) -> list[int] | None:
        """The entries to drop before keeping one of `length` tokens, so that the budget holds
        with it too (estimated from the bytes per token of the last entry kept); None when it
        alone would be over the budget: then it is not kept at all."""
        need = int(self.per_token * length)
        if need > self.budget:
            return None
        gone = []
        while self.entries and self.nbytes + need > self.budget:
            gone.append(self._drop_oldest())
        return gone

    def _drop_oldest(self) -> int:
        oldest = min(self.entries, key=lambda i: self.entries[i].used)
        del self.entries[oldest]
        self.evictions += 1
        return oldest

    def kept(self, entry: int, tokens: Sequence[int], rank0_bytes: int) -> list[int]:
        """Records an entry every rank now holds; returns the entries to drop: those it makes
        redundant (prefixes it can be cut to), then the least recently used while over budget
        (itself too, when it alone is over)."""
        t = np.asarray(tokens, dtype=np.int64)
        self.clock += 1
        gone = [
            i
            for i, e in self.entries.items()
            if common_prefix(e.tokens, t) == len(e.tokens) and self.can_cut(len(t), len(e.tokens))
        ]
        for i in gone:
            del self.entries[i]
        nbytes = int(rank0_bytes * self.scale)
        self.entries[entry] = Entry(t, nbytes, self.clock)
        self.per_token = nbytes / len(t)
        while self.entries and self.nbytes > self.budget:
            gone.append(self._drop_oldest())
        return gone


def remember(prefix: PrefixCache, runner, slot: int, tokens: list[int]) -> None:
    """Every rank keeps slot's caches (holding tokens) as an entry, when worth it, after
    dropping what it would push over the budget, then what it makes redundant. Never raises:
    the answer is complete whatever happens here. When keeping fails (rank 0 out of memory,
    say), every rank is told to drop the entry, which some may hold; a broken ring fails at its
    next step instead."""
    entry = prefix.admit(tokens)
    room = prefix.make_room(len(tokens)) if entry is not None else None
    if room is None:
        return
    try:
        for gone in room:
            runner.evict(gone)
        nbytes = runner.keep(slot, entry, len(tokens))
        for gone in prefix.kept(entry, tokens, nbytes):
            runner.evict(gone)
    except Exception as e:  # noqa: BLE001 - logged; the index forgets the entry
        print(f"[rank 0] prefix cache: could not keep an entry: {e}", file=sys.stderr, flush=True)
        prefix.entries.pop(entry, None)
        try:
            runner.evict(entry)
        except Exception:  # noqa: BLE001 - the ring itself is gone: its next step says so
            pass


def layer_scale(grows: list[bool], ranges: list[tuple[int, int]]) -> float:
    """The most a rank holds of an entry over what rank 0 holds: entries grow in the layers
    whose caches grow with the context (full attention), not in sliding windows, so the ranks'
    counts of those layers (ranges: each rank's first and one-past-last layer)."""
    counts = [sum(grows[a:b]) for a, b in ranges]
    if counts[0] == 0:  # rank 0 holds only windows: count every layer instead
        counts = [b - a for a, b in ranges]
    return max(counts) / max(1, counts[0])


def can_cut_all(templates: list, cut: Callable) -> CanCut:
    """can_cut for a model whose layers' caches are like templates (one per layer of the whole
    model), given the runtime's per-cache rule cut(template, length, keep)."""
    kinds = {(type(t), getattr(t, "max_size", None)): t for t in templates}
    return lambda length, keep: all(cut(t, length, keep) for t in kinds.values())
