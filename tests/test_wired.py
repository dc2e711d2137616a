"""The wired limit a rank sets before loading: Metal's recommended working set, as mlx-lm sets
it; nothing without Metal. Pure, plus the real call on this machine's MLX."""

import mlx.core as mx
import pytest

from mlxdist.runtime.wired import recommended_limit, set_recommended_wired_limit

GIB = 2**30


@pytest.mark.parametrize(
    "metal,info,expected",
    [
        (True, {"max_recommended_working_set_size": 144 * GIB}, 144 * GIB),
        (True, {"device_name": "Apple M3 Ultra"}, None),  # no figure: leave the limit alone
        (True, {"max_recommended_working_set_size": 0}, None),
        (False, {"max_recommended_working_set_size": 144 * GIB}, None),  # no Metal
        (False, {"architecture": "x86_64", "device_name": "Intel(R) Xeon(R) Processor"}, None),
    ],
)
def test_recommended_limit(metal, info, expected):
    assert recommended_limit(metal, info) == expected


def test_the_rank_call_follows_this_machines_mlx():
    """On a Mac with Metal the limit set is the device's working set (as mlx-lm's
    maybe_set_recommended_wired_limit sets it); on the CPU nothing is set."""
    expected = recommended_limit(mx.metal.is_available(), mx.device_info())
    assert set_recommended_wired_limit() == expected
    if not mx.metal.is_available():
        assert expected is None
