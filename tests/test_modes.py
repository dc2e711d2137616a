"""A launch's --parallel options, checked from config.json before anything starts
(launcher/modes.py): mlx-lm's own model lookup, remapped families included."""

from __future__ import annotations

import re

import pytest

from launcher.modes import check_tensor_split, parallel_options
from quantize.checkpoint import CheckpointError

HEADS = {"num_attention_heads": 8, "num_key_value_heads": 4}

# (config, ranks, the refusal's words or None)
TENSOR = [
    ({"model_type": "llama", **HEADS}, 2, None),
    ({"model_type": "llama", **HEADS}, 4, None),
    ({"model_type": "mistral", **HEADS}, 2, None),  # mlx-lm remaps it to llama
    ({"model_type": "kimi_k2", **HEADS}, 2, None),  # and Kimi K2 to deepseek_v3
    ({"model_type": "llama", **HEADS}, 8, "num_key_value_heads=4 does not divide by 8"),
    ({"model_type": "llama", **HEADS}, 3, "num_attention_heads=8 does not divide by 3"),
    ({"model_type": "afm7", **HEADS}, 2, "model has no shard()"),
    ({"model_type": "no_such_family", **HEADS}, 2, "mlx-lm has no no_such_family model"),
]


@pytest.mark.parametrize(("config", "ranks", "refusal"), TENSOR)
def test_check_tensor_split(config, ranks, refusal):
    if refusal is None:
        check_tensor_split(config, ranks)
    else:
        with pytest.raises(CheckpointError, match=re.escape(refusal)):
            check_tensor_split(config, ranks)


R1ISH = {"model_type": "deepseek_v3", "n_routed_experts": 8, **HEADS}
KIMI = R1ISH | {"model_type": "kimi_k2"}  # mlx-lm runs it with deepseek_v3's code

# (config, parallel, experts, ranks, options or the refusal's words)
OPTIONS = [
    (R1ISH, "pipeline", None, 2, {}),
    (R1ISH, "expert", None, None, {"parallel": "expert", "experts": None, "ranks": 2}),
    (R1ISH, "expert", "3,3,2", None, {"parallel": "expert", "experts": [3, 3, 2], "ranks": 3}),
    (R1ISH, "tensor", None, 4, {"parallel": "tensor", "experts": None, "ranks": 4}),
    (KIMI, "expert", "3,5", None, {"parallel": "expert", "experts": [3, 5], "ranks": 2}),
    (KIMI, "tensor", None, 2, {"parallel": "tensor", "experts": None, "ranks": 2}),
    (R1ISH, "data", None, 2, "--parallel data: choose pipeline, expert or tensor"),
    (R1ISH, "pipeline", "4,4", 2, "--experts is for --parallel expert"),
    (R1ISH, "expert", "3,3,2", 2, "--experts gives 3 ranks but --local 2"),
    (R1ISH, "expert", None, 9, "9 ranks are more than the model's 8 routed experts"),
    ({"model_type": "llama", **HEADS}, "expert", None, 2, "this model has no routed experts"),
    (R1ISH, "tensor", None, 3, "does not divide by 3"),
]


@pytest.mark.parametrize(("config", "parallel", "experts", "ranks", "want"), OPTIONS)
def test_parallel_options(config, parallel, experts, ranks, want):
    if isinstance(want, dict):
        assert parallel_options(config, parallel, experts, ranks) == want
    else:
        with pytest.raises(ValueError, match=want):
            parallel_options(config, parallel, experts, ranks)
