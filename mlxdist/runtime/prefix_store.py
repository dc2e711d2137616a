"""Every rank's kept KV caches of known prefixes (the prefix cache's entries), and copies of a
stage's caches cut to a prefix.

Rank 0 decides what is kept and dropped (mlxdist/serving/prefix_cache.py) and tells every rank in
the control messages, which every rank takes in the same order: so all ranks hold the same
entries, each for its own layers. A new sequence starts from a copy of an entry (or of a running
sequence's cache) cut to the prefix it shares, and only its new tokens are computed.

MLX arrays are values: a copy that slices an entry's arrays never changes the entry, whatever the
copy's cache later writes into its own arrays.
"""

from __future__ import annotations

import sys
import zlib

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import (
    ArraysCache,
    CacheList,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
)

from mlxdist.runtime.step import CMD_EVICT, CMD_KEEP, Step


def can_cut(template, length: int, keep: int) -> bool:
    """Whether a cache of this kind holding `length` positions can be cut to its first `keep`:
    any full cache can; a sliding window only before it has wrapped; a recurrent state (or a
    kind not known here) only whole, and an empty one always."""
    if keep == length or keep == 0:
        return True
    if isinstance(template, CacheList):
        return all(can_cut(c, length, keep) for c in template.caches)
    if isinstance(template, (KVCache, QuantizedKVCache)):
        return keep < length
    if isinstance(template, RotatingKVCache):
        return keep < length < template.max_size
    return False


def grows(template) -> bool:
    """Whether a cache of this kind grows with the context (a full cache), unlike a window."""
    if isinstance(template, CacheList):
        return any(grows(c) for c in template.caches)
    return isinstance(template, (KVCache, QuantizedKVCache))


def trimmable(template) -> bool:
    """Whether a cache of this kind can always drop its last positions (speculative decoding
    drops rejected drafts): full caches can; a sliding window cannot once it has filled, nor a
    recurrent state."""
    if isinstance(template, CacheList):
        return all(trimmable(c) for c in template.caches)
    return isinstance(template, (KVCache, QuantizedKVCache))


def obey_logged(obey, step, rank: int) -> None:
    """A rank other than 0 takes a prefix-cache command; a failure (out of memory, say) leaves
    the entry out of its store, said in its log, instead of taking the rank down: the stats'
    digest shows the ranks differ."""
    try:
        obey(step)
    except Exception as e:  # noqa: BLE001 - logged; the rank goes on serving
        print(f"[rank {rank}] prefix cache: could not take a command: {e}", file=sys.stderr)


def reusable(template) -> bool:
    """Whether this kind of cache can be copied at all (else the model gets no prefix cache)."""
    if isinstance(template, CacheList):
        return all(reusable(c) for c in template.caches)
    return isinstance(template, (KVCache, QuantizedKVCache, RotatingKVCache, ArraysCache))


def clone(cache, keep: int):
    """A new cache holding the first `keep` positions of `cache` (all of them when keep is its
    length); cache itself is left as it was."""
    if isinstance(cache, CacheList):
        return CacheList(*(clone(c, keep) for c in cache.caches))
    if isinstance(cache, ArraysCache):
        new = ArraysCache(len(cache.cache))
        new.cache = list(cache.cache)  # layers replace these arrays, never write into them
        return new
    if isinstance(cache, (KVCache, QuantizedKVCache, RotatingKVCache)):
        new = object.__new__(type(cache))
        new.__dict__.update(cache.__dict__)
        if cache.keys is None or keep == 0:
            new.keys = new.values = None
            new.offset = 0
            if isinstance(cache, RotatingKVCache):
                new._idx = 0
            return new
        wrapped = isinstance(cache, RotatingKVCache) and cache.offset >= cache.max_size
        if wrapped and keep != cache.offset:
            raise ValueError("a sliding window that has wrapped can only be copied whole")
        cut = slice(None) if wrapped else slice(0, keep)  # a wrapped window: in its own order
        # contiguous: a copy, so a kept entry does not hold its source's spare room
        new.keys, new.values = tree_map(
            lambda x: mx.contiguous(x[..., cut, :]), (cache.keys, cache.values)
        )
        if isinstance(cache, RotatingKVCache) and not wrapped:
            new._idx = keep
        new.offset = keep
        return new
    raise ValueError(f"cannot copy a {type(cache).__name__}")


def _spare(cache, length: int) -> int:
    """Positions a cache has room for beyond `length` (a full cache grows 256 at a time); a
    cache holding more than length counts as all spare, so it is copied."""
    if isinstance(cache, CacheList):
        return max(_spare(c, length) for c in cache.caches)
    if not isinstance(cache, (KVCache, QuantizedKVCache)) or cache.keys is None:
        return 0 if getattr(cache, "offset", length) == length else length
    if cache.offset != length:
        return length
    keys = cache.keys[0] if isinstance(cache.keys, (tuple, list)) else cache.keys
    return keys.shape[2] - length


def clone_all(caches: list, keep: int) -> list:
    return [clone(c, keep) for c in caches]


def cache_nbytes(caches: list) -> int:
    arrays = [c.state for c in caches]
    return sum(v.nbytes for _, v in tree_flatten(arrays) if isinstance(v, mx.array))


def checksum(caches: list, length: int) -> float:
    """The sum of the magnitudes of every value a stage's caches hold in their first `length`
    positions (all of a window's or a state's): equal for equal caches, to rounding."""
    total = 0.0
    for cache in caches:
        if isinstance(cache, CacheList):
            total += checksum(list(cache.caches), length)
            continue
        state = cache.state
        if isinstance(cache, (KVCache, QuantizedKVCache)):
            if cache.keys is None:
                continue
            state = tree_map(lambda x: x[..., :length, :], (cache.keys, cache.values))
        for _, v in tree_flatten(state):
            if isinstance(v, mx.array):
                total += mx.sum(mx.abs(v.astype(mx.float32))).item()
    return total


class KeepsPrefixes:
    """Rank 0's prefix-cache commands, for a runner whose _command(step) has every rank take a
    command (in order with the steps) and returns what rank 0's own _obey gave."""

    def keep(self, slot: int, entry: int, length: int) -> int:
        """Every rank keeps the first `length` positions of slot's caches as entry; returns the
        bytes rank 0 keeps."""
        return self._command(Step(length, 0, cmd=CMD_KEEP, slot=slot, src=entry))

    def evict(self, entry: int) -> None:
        """Every rank drops entry."""
        self._command(Step(0, 0, cmd=CMD_EVICT, src=entry))


class PrefixStore:
    """One rank's kept entries: entry id -> (positions held, its stage's caches)."""

    def __init__(self):
        self.entries: dict[int, tuple[int, list]] = {}
        self._sums: dict[int, float] = {}  # entry -> checksum, made when first asked for

    def keep(self, entry: int, caches: list, length: int) -> int:
        """Keeps a finished sequence's caches, holding `length` positions, as entry: the caches
        themselves (the caller lets go of them: no copy), or a copy when they hold more, or
        when their spare room is over an eighth of it. Returns the entry's bytes."""
        fits = all(_spare(c, length) * 8 <= length for c in caches)
        kept = caches if fits else clone_all(caches, length)
        mx.eval([c.state for c in kept])
        self.entries[entry] = (length, kept)
        return cache_nbytes(kept)

    def start(self, entry: int, keep: int) -> list:
        """A new sequence's caches: entry's first `keep` positions."""
        return clone_all(self.entries[entry][1], keep)

    def evict(self, entry: int) -> None:
        self.entries.pop(entry, None)
        self._sums.pop(entry, None)

    def figures(self) -> list[int]:
        """[entries, bytes, digest of (id, positions) pairs, the entries' checksums summed in
        thousandths]: the first three equal on ranks that hold the same entries."""
        pairs = sorted((e, n) for e, (n, _) in self.entries.items())
        digest = zlib.crc32(repr(pairs).encode())
        nbytes = sum(cache_nbytes(caches) for _, caches in self.entries.values())
        for e, (n, caches) in self.entries.items():
            if e not in self._sums:  # entries never change: each is read once, when asked
                self._sums[e] = checksum(caches, n)
        total = sum(self._sums[e] for e in self.entries)
        return [len(pairs), nbytes, digest, round(total * 1000)]
