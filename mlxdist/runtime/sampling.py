"""Sampling on the last rank, one sampler per sequence so that interleaved sequences stay apart."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p


class Sampler:
    """Greedy at temperature 0; otherwise nucleus sampling as mlx-lm's make_sampler does it.

    With a seed, the sequence keeps its own random key and splits it on each draw exactly as
    MLX splits its global key, so a seeded answer is the one `mx.random.seed(seed)` then
    mlx-lm would give, whatever other sequences sample in between.
    """

    def __init__(self, temp: float = 0.0, top_p: float = 1.0, seed: int = -1):
        self.temp = temp
        self.top_p = top_p
        self.key = mx.random.key(seed) if seed >= 0 else None

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.temp == 0:
            return mx.argmax(logprobs, axis=-1)
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        scaled = logprobs * (1.0 / self.temp)
        if self.key is None:
            return mx.random.categorical(scaled)
        self.key, draw = mx.random.split(self.key)
        return mx.random.categorical(scaled, key=draw)
