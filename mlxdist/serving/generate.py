"""Token generation on rank 0, driving the pipeline one step at a time."""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx

from launcher.rankspec import PREFILL_CHUNK
from mlxdist.runtime.runner import StepRunner
from mlxdist.runtime.step import LOGITS, NEW, SAMPLE, Step
from mlxdist.serving.schedule import prefill_steps


def generate_tokens(
    runner: StepRunner,
    prompt: list[int],
    max_tokens: int,
    *,
    temp: float = 0.0,
    top_p: float = 1.0,
    seed: int = -1,
    eos_ids: set[int] | frozenset[int] = frozenset(),
    chunk: int = PREFILL_CHUNK,
    src: int = 0,
    keep: int = 0,
) -> Iterator[int]:
    """Yields sampled token ids until an end-of-sequence token or max_tokens. With src, the
    caches start as the prefix cache's entry src cut to the prompt's first `keep` positions,
    and only the rest of the prompt is computed."""
    steps = prefill_steps(prompt[keep:], chunk=chunk)
    if max_tokens <= 0:
        return
    sampling = {"seed": seed, "temp": temp, "top_p": top_p}
    for tokens, flags in steps:
        cached = {"src": src, "keep": keep} if flags & NEW else {}
        token = runner.step(tokens, Step(0, flags, **sampling, **cached))
    if runner.size == 1:
        yield from _decode_overlapped(runner, token, max_tokens, eos_ids)
        return
    for n in range(max_tokens):
        t = token.item()
        yield t
        if t in eos_ids or n + 1 == max_tokens:
            return
        token = runner.step([t], Step(0, SAMPLE))


def _decode_overlapped(
    runner: StepRunner, token: mx.array, max_tokens: int, eos_ids: set[int] | frozenset[int]
) -> Iterator[int]:
    """One rank, no ring: as mlx-lm's generate_step, the next step is built and queued while
    the current one computes, so Python's share of a step overlaps MLX's. The same operations
    as pipeline.Runner.step on the last rank, so the same tokens."""
    stage = runner.stage

    def step(y: mx.array) -> mx.array:
        h = stage.forward(stage.embed(y[None]), runner.cache)
        logits = stage.logits(h[:, -1, :])
        return runner.sampler(logits - mx.logsumexp(logits, keepdims=True)).astype(mx.int32)

    for n in range(max_tokens):
        last = n + 1 == max_tokens
        if not last:
            following = step(token)
            mx.async_eval(following)
        t = token.item()
        yield t
        if t in eos_ids or last:
            return
        token = following


def last_logits(runner: StepRunner, prompt: list[int]) -> mx.array:
    """The logits at the last position of prompt, from one pass over the whole prompt."""
    return runner.step(prompt, Step(0, NEW | LOGITS))
