"""Tensor mode refuses, in one line, a family whose mlx-lm model has no shard(), naming the
families it runs; and a width mlx-lm's shard() would cut unevenly, before any rank starts.
(A launch refuses a family mlxdist does not run at all earlier, in a line naming those it runs;
every family it runs has shard(), which the last test checks.)"""

from __future__ import annotations

import re

import pytest

from launcher.modes import TENSOR_FAMILIES, check_tensor_split, parallel_options
from quantize.checkpoint import CheckpointError

HEADS = {"num_attention_heads": 8, "num_key_value_heads": 4}
NAMED = ", ".join(TENSOR_FAMILIES)

# (config, ranks, the refusal's words or None)
CASES = [
    ({"model_type": "phi3", **HEADS}, 2, "mlx-lm's phi3 model has no shard(), so tensor mode"),
    ({"model_type": "phi3", **HEADS}, 2, f"(it runs {NAMED}): use --parallel pipeline or expert"),
    ({"model_type": "gemma2", **HEADS}, 2, "mlx-lm's gemma2 model has no shard()"),
    ({"model_type": "qwen3", **HEADS, "intermediate_size": 256}, 3, "num_attention_heads=8"),
    ({"model_type": "qwen3", **HEADS, "intermediate_size": 256}, 4, None),
    (
        {
            "model_type": "qwen3",
            "num_attention_heads": 6,
            "num_key_value_heads": 3,
            "intermediate_size": 256,
        },
        3,
        "intermediate_size=256 does not divide by 3 ranks",
    ),
    (
        {"model_type": "qwen3_moe", **HEADS, "intermediate_size": 256, "moe_intermediate_size": 90},
        4,
        "moe_intermediate_size=90 does not divide by 4 ranks",
    ),
]


@pytest.mark.parametrize(("config", "ranks", "refusal"), CASES)
def test_tensor_split_refusal(config, ranks, refusal):
    if refusal is None:
        check_tensor_split(config, ranks)
        return
    with pytest.raises(CheckpointError, match=re.escape(refusal)) as caught:
        check_tensor_split(config, ranks)
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match=re.escape(refusal)):
        parallel_options(config, "tensor", None, ranks)


def test_every_named_family_has_shard():
    """The families the refusal names are ones mlx-lm can cut (mistral through llama's class)."""
    for model_type in TENSOR_FAMILIES:
        check_tensor_split({"model_type": model_type, **HEADS}, 2)
