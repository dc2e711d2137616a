"""A prompt's steps into the model, as mlx-lm's generate_step takes them: the same for a job run
alone and for interleaved answers, so both compute exactly what a single process does."""

from __future__ import annotations

from launcher.rankspec import PREFILL_CHUNK
from mlxdist.runtime.step import NEW, SAMPLE


def prefill_steps(prompt: list[int]) -> list[tuple[list[int], int]]:
    """(tokens, flags) of each step that feeds prompt: all but its last token in PREFILL_CHUNK
    pieces, NEW on the first, then the last token with SAMPLE (and NEW when it is the first)."""
    if not prompt:
        raise ValueError("the prompt has no tokens")
    head, flags, steps = prompt[:-1], NEW, []
    for i in range(0, len(head), PREFILL_CHUNK):
        steps.append((head[i : i + PREFILL_CHUNK], flags))
        flags = 0
    steps.append((prompt[-1:], flags | SAMPLE))
    return steps
