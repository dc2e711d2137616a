"""Each rank holds only its share: peak memory of a 2-rank cluster of the 1 GB tiny-r1."""

from __future__ import annotations

import pytest
from conftest import local_cluster

pytestmark = pytest.mark.cluster


def test_rank_memory_is_its_share(r1_1gb):
    with local_cluster(r1_1gb, [9, 8]) as (_, health):
        memory = health["memory"]
    assert [m["rank"] for m in memory] == [0, 1]
    total = sum(m["weights"] for m in memory)
    print(f"\n{'rank':>4} {'held MiB':>9} {'above base MiB':>15} {'ratio':>6}")
    for m in memory:
        above = m["peak_rss"] - m["before_weights"]
        ratio = above / m["weights"]
        print(f"{m['rank']:>4} {m['weights'] / 2**20:>9.1f} {above / 2**20:>15.1f} {ratio:>6.3f}")
        # Its layers plus the embeddings, norm and head it holds (all counted in "weights"),
        # plus 25%; and well under the whole model, so nothing else was read in.
        assert above <= 1.25 * m["weights"]
        assert m["weights"] < 0.6 * total
