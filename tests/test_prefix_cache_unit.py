"""The prefix cache's pure parts: rank 0's index (longest usable prefix, what a finished answer
adds, what the budget drops) and the copies each rank makes of its caches, for every kind of
cache the families use (full, quantised, sliding window, recurrent state, cache lists)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import (
    ArraysCache,
    CacheList,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
)

from mlxdist.runtime.prefix_store import PrefixStore, can_cut, clone, reusable
from mlxdist.serving.prefix_cache import (
    NO_MATCH,
    Entry,
    Match,
    PrefixCache,
    can_cut_all,
    common_prefix,
)

ANY = lambda length, keep: True  # noqa: E731  full caches: any cut
WHOLE = lambda length, keep: keep == length  # noqa: E731  recurrent: only whole


@pytest.mark.parametrize(
    "a, b, n",
    [
        ([], [1], 0),
        ([1, 2, 3], [1, 2, 3], 3),
        ([1, 2, 3], [1, 2], 2),
        ([1, 9], [1, 2, 3], 1),
        ([4], [5], 0),
    ],
)
def test_common_prefix(a, b, n):
    assert common_prefix(np.array(a), np.array(b)) == n


def _index(entries: dict[int, list[int]], budget=10**9, can_cut=ANY) -> PrefixCache:
    index = PrefixCache(budget, can_cut)
    for tokens in entries.values():
        entry = index.admit(tokens)
        assert entry is not None
        index.kept(entry, tokens, 10 * len(tokens))
    return index


@pytest.mark.parametrize(
    "entries, running, prompt, can_cut, expected",
    [
        # the longest shared prefix wins; the prompt's last token is always computed
        ({1: [1, 2, 3, 4], 2: [1, 2, 9]}, {}, [1, 2, 3, 7], ANY, Match(1, 3)),
        ({1: [1, 2, 3, 4]}, {}, [1, 2, 3, 4], ANY, Match(1, 3)),
        ({1: [1, 2, 3, 4]}, {}, [1, 2, 3, 4, 5, 6], ANY, Match(1, 4)),
        ({1: [5, 6]}, {}, [1, 2, 3], ANY, NO_MATCH),
        ({1: [1, 2]}, {}, [1], ANY, NO_MATCH),  # one token: nothing to reuse
        # a running sequence's caches count too (as -slot); an entry wins a tie
        ({}, {3: [1, 2, 3, 4, 5]}, [1, 2, 3, 4, 8], ANY, Match(-3, 4)),
        ({1: [1, 2, 3]}, {3: [1, 2, 3, 4]}, [1, 2, 3, 9], ANY, Match(1, 3)),
        # caches that cannot be cut serve only prompts that hold them whole
        ({1: [1, 2, 3, 4]}, {}, [1, 2, 3, 7], WHOLE, NO_MATCH),
        ({1: [1, 2], 2: [1, 2, 3, 4]}, {}, [1, 2, 3, 7], WHOLE, Match(1, 2)),
        ({1: [1, 2, 3, 4]}, {}, [1, 2, 3, 4, 5], WHOLE, Match(1, 4)),
    ],
)
def test_lookup(entries, running, prompt, can_cut, expected):
    index = PrefixCache(10**9, can_cut)
    for entry, tokens in entries.items():  # set as given, none making another redundant
        index.entries[entry] = Entry(np.array(tokens), 1, 0)
    assert index.lookup(prompt, running) == expected
    assert index.hits == (1 if expected.keep else 0)
    assert index.cached_tokens == expected.keep


def test_admit_skips_what_an_entry_already_holds_and_kept_drops_what_it_makes_redundant():
    index = _index({1: [1, 2, 3, 4, 5]})
    assert index.admit([1, 2, 3]) is None  # entry 1 cut to 3 positions serves it
    assert index.admit([1, 2, 3, 4, 5]) is None
    entry = index.admit([1, 2, 3, 4, 5, 6, 7])
    assert entry == 2
    assert index.kept(entry, [1, 2, 3, 4, 5, 6, 7], 70) == [1]  # 1 is a prefix of the new one
    assert list(index.entries) == [2]
    # recurrent caches: a longer entry cannot stand in for a shorter one
    whole = _index({1: [1, 2, 3]}, can_cut=WHOLE)
    assert whole.admit([1, 2]) is not None
    entry = whole.admit([1, 2, 3, 4])
    assert whole.kept(entry, [1, 2, 3, 4], 40) == []
    assert len(whole.entries) == 2


def test_budget_drops_the_least_recently_used_and_an_entry_alone_over_it():
    index = PrefixCache(100, ANY)
    ids = []
    for tokens in ([1, 1, 1], [2, 2, 2]):
        ids.append(index.admit(tokens))
        assert index.kept(ids[-1], tokens, 40) == []
    index.lookup([1, 1, 1, 9])  # entry 1 used: entry 2 is now the oldest
    third = index.admit([3, 3, 3])
    assert index.kept(third, [3, 3, 3], 40) == [ids[1]]
    assert index.nbytes == 80 and index.evictions == 1
    huge = index.admit([4, 4, 4])
    assert sorted(index.kept(huge, [4, 4, 4], 500)) == sorted([ids[0], third, huge])
    assert index.entries == {} and index.evictions == 4
    # the budget counts the rank that holds the most: scale 1.5 makes 40 bytes 60
    scaled = PrefixCache(100, ANY, scale=1.5)
    a = scaled.admit([1, 2])
    scaled.kept(a, [1, 2], 40)
    b = scaled.admit([3, 4])
    assert scaled.kept(b, [3, 4], 40) == [a]


def test_off_keeps_and_finds_nothing():
    index = PrefixCache(0, ANY)
    assert index.admit([1, 2, 3]) is None
    assert index.lookup([1, 2, 3]) == NO_MATCH


def _filled(cache, n: int, seed: int = 0):
    """cache after n positions of random keys and values, in one chunk or one at a time."""
    mx.random.seed(seed)
    keys = mx.random.normal((1, 2, n, 64))
    values = mx.random.normal((1, 2, n, 64))
    if isinstance(cache, RotatingKVCache):
        for i in range(n):  # decode steps: the window wraps in place
            cache.update_and_fetch(keys[:, :, i : i + 1], values[:, :, i : i + 1])
    else:
        cache.update_and_fetch(keys, values)
    return cache, keys, values


def _kv(cache):
    k, v = cache.state[:2]
    if isinstance(k, (tuple, list)):
        k = mx.dequantize(*k, group_size=cache.group_size, bits=cache.bits)
        v = mx.dequantize(*v, group_size=cache.group_size, bits=cache.bits)
    return np.array(k[..., : cache.offset, :]), np.array(v[..., : cache.offset, :])


@pytest.mark.parametrize("make", [KVCache, lambda: QuantizedKVCache(64, 8)], ids=["full", "q8"])
def test_a_cut_copy_holds_the_prefix_and_leaves_its_source_alone(make):
    source, keys, values = _filled(make(), 10)
    before = _kv(source)
    copy = clone(source, 6)
    assert copy.offset == 6
    k, v = _kv(copy)
    np.testing.assert_array_equal(k, before[0][..., :6, :])
    # the copy goes on with other tokens; the source is unchanged
    copy.update_and_fetch(mx.ones((1, 2, 3, 64)), mx.ones((1, 2, 3, 64)))
    mx.eval(copy.state)
    after = _kv(source)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    assert copy.offset == 9 and source.offset == 10
    assert clone(source, 0).offset == 0 and clone(source, 0).keys is None


def test_sliding_windows_cut_only_before_they_wrap():
    window = RotatingKVCache(max_size=8)
    assert can_cut(window, 5, 3) and can_cut(window, 9, 9) and not can_cut(window, 9, 5)
    source, *_ = _filled(RotatingKVCache(max_size=8), 12)  # wrapped
    whole = clone(source, 12)
    assert (whole.offset, whole._idx) == (source.offset, source._idx)
    np.testing.assert_array_equal(np.array(whole.keys), np.array(source.keys))
    with pytest.raises(ValueError, match="whole"):
        clone(source, 5)
    young, *_ = _filled(RotatingKVCache(max_size=8), 6)
    cut = clone(young, 4)
    assert (cut.offset, cut._idx, cut.keys.shape[2]) == (4, 4, 4)


def test_recurrent_states_and_cache_lists():
    state = ArraysCache(2)
    state[0], state[1] = mx.ones((1, 3)), mx.zeros((1, 3))
    copy = clone(state, 5)
    copy[0] = mx.full((1, 3), 7.0)  # layers replace their state, never write into it
    assert state[0].tolist() == [[1.0, 1.0, 1.0]]
    assert not can_cut(state, 5, 3) and can_cut(state, 5, 5) and reusable(state)
    pair = CacheList(KVCache(), RotatingKVCache(max_size=4))
    assert can_cut(pair, 3, 2) and not can_cut(pair, 6, 2) and reusable(pair)
    rule = can_cut_all([KVCache(), RotatingKVCache(max_size=4), KVCache()], can_cut)
    assert rule(3, 1) and rule(7, 7) and not rule(7, 2)


def test_store_figures_match_on_equal_entries():
    a, b = PrefixStore(), PrefixStore()
    source, *_ = _filled(KVCache(), 250)
    whole = source.keys.nbytes + source.values.nbytes  # room for 256 positions, as allocated
    for store in (a, b):
        assert store.keep(3, [source], 250) == whole  # all it holds: kept as it is, no copy
        assert store.entries[3][1][0] is source
        assert store.keep(5, [source], 4) == 2 * 2 * 4 * 64 * 4  # a copy of the first 4
    small, *_ = _filled(KVCache(), 10)  # 246 positions spare: a compact copy is kept
    assert a.keep(6, [small], 10) == 2 * 2 * 10 * 64 * 4 and a.entries[6][1][0] is not small
    a.evict(6)
    assert a.figures() == b.figures()
    b.evict(5)
    assert a.figures()[2] != b.figures()[2] and b.figures()[:2] == [1, whole]
    started = a.start(3, 7)
    assert started[0].offset == 7


def test_room_is_made_before_keeping_and_an_entry_alone_over_budget_is_not_kept():
    index = PrefixCache(100, ANY)
    assert index.make_room(50) == []  # nothing kept yet: no estimate
    a = index.admit([1, 1, 1, 1])
    index.kept(a, [1, 1, 1, 1], 40)  # 10 bytes a token from now on
    b = index.admit([2, 2, 2, 2])
    index.kept(b, [2, 2, 2, 2], 40)
    assert index.make_room(3) == [a]  # 80 + 30 > 100: the oldest goes first
    assert index.make_room(11) is None  # 110 bytes alone: not kept


class _Runner:
    """Records the commands remember gives; keep fails when told to."""

    def __init__(self, fail: bool):
        self.fail, self.commands = fail, []

    def keep(self, slot, entry, length):
        self.commands.append(("keep", entry))
        if self.fail:
            raise RuntimeError("out of memory")
        return 10 * length

    def evict(self, entry):
        self.commands.append(("evict", entry))


def test_remember_never_raises_and_a_failed_keep_is_dropped_everywhere(capsys):
    from mlxdist.serving.prefix_cache import remember

    index = PrefixCache(10**6, ANY)
    broken = _Runner(fail=True)
    remember(index, broken, 3, [1, 2, 3])
    assert broken.commands == [("keep", 1), ("evict", 1)] and index.entries == {}
    assert "could not keep an entry: out of memory" in capsys.readouterr().err
    working = _Runner(fail=False)
    remember(index, working, 3, [1, 2, 3])
    assert working.commands == [("keep", 2)] and list(index.entries) == [2]


@pytest.mark.parametrize(
    "grows, ranges, scale",
    [
        ([True] * 4, [(0, 2), (2, 4)], 1.0),
        ([True] * 4, [(0, 1), (1, 4)], 3.0),
        # gpt-oss alternates windows and full layers: 2 full layers on rank 0, 3 on rank 1
        ([False, True] * 5, [(0, 4), (4, 10)], 1.5),
        ([False, False, True, True], [(0, 2), (2, 4)], 1.0),  # rank 0 only windows: layers
    ],
)
def test_layer_scale(grows, ranges, scale):
    from mlxdist.serving.prefix_cache import layer_scale

    assert layer_scale(grows, ranges) == scale


def test_checksum_counts_only_the_positions_held():
    from mlxdist.runtime.prefix_store import checksum

    source, keys, values = _filled(KVCache(), 10)
    whole = float(mx.sum(mx.abs(keys)).item() + mx.sum(mx.abs(values)).item())
    assert checksum([source], 10) == pytest.approx(whole, rel=1e-6)
    assert checksum([clone(source, 6)], 6) == pytest.approx(checksum([source], 6), rel=1e-6)
    assert checksum([source], 6) < checksum([source], 10)


def test_only_full_caches_can_drop_rejected_drafts():
    from mlxdist.runtime.prefix_store import trimmable

    assert trimmable(KVCache()) and trimmable(QuantizedKVCache(64, 8))
    assert trimmable(CacheList(KVCache(), KVCache()))
    assert not trimmable(RotatingKVCache(max_size=8)) and not trimmable(ArraysCache(2))
    assert not trimmable(CacheList(KVCache(), RotatingKVCache(max_size=8)))


def test_a_failed_command_on_another_rank_is_logged_not_raised(capsys):
    from mlxdist.runtime.prefix_store import obey_logged

    def obey(step):
        raise MemoryError("no room")

    obey_logged(obey, None, 2)
    assert "[rank 2] prefix cache: could not take a command: no room" in capsys.readouterr().err
