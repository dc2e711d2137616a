"""The planner's KV cache size per token and layer against what mlx-lm's own caches hold after
a prompt, for every family make-model writes: MLA families (R1, Kimi K2, V3.2 with its
indexer's keys) cache a compressed latent, the others K and V per KV head. gpt-oss's sliding
layers hold at most their window, so the planner's figure is an upper bound there."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from conftest import family_model
from mlx_lm.models.cache import make_prompt_cache

from launcher.planner import activation_bytes, kv_bytes_per_token_per_layer
from mlxdist.testing.families import family_names

PROMPT = 24  # tokens, fewer than gpt-oss's tiny sliding window


def _cached_values(cache) -> float:
    """Values the caches hold for the tokens seen, not the buffers they grew into (a cache
    allocates the sequence axis in steps)."""
    total = 0.0
    for c in cache:
        if hasattr(c, "caches"):  # CacheList: V3.2's attention and indexer caches
            total += _cached_values(c.caches)
            continue
        held = min(c.offset, c.keys.shape[-2])
        total += (c.keys.size + c.values.size) / c.keys.shape[-2] * held
    return total


@pytest.mark.parametrize("name", family_names())
def test_planner_kv_bytes_equal_mlx_lm_caches(tmp_path, name):
    path, model, _ = family_model(name, tmp_path / name)
    config = json.loads((path / "config.json").read_text())
    cache = make_prompt_cache(model)  # the model's own make_cache where it has one
    model(mx.array([list(range(1, PROMPT + 1))]), cache=cache)
    per_token_layer = _cached_values(cache) / (PROMPT * config["num_hidden_layers"])
    # in values, as the planner sizes them in the checkpoint's dtype
    assert kv_bytes_per_token_per_layer(config) / activation_bytes(config) == per_token_layer, name
