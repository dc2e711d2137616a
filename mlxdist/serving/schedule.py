"""A prompt's steps into the model, as mlx-lm's generate_step takes them: the same for a job run
alone and for interleaved answers, so both compute exactly what a single process does."""

from __future__ import annotations

from launcher.rankspec import PREFILL_CHUNK
from mlxdist.runtime.step import NEW, SAMPLE


def prefill_steps(prompt: list[int], chunk: int = PREFILL_CHUNK) -> list[tuple[list[int], int]]:
    """(tokens, flags) of each step that feeds prompt: all but its last token in pieces of
    `chunk` tokens, NEW on the first, then the last token with SAMPLE (and NEW when it is the
    first). Smaller chunks let a pipeline's stages each work on a different piece at once
    (launcher.perfmodel.prefill_chunk picks the size); PREFILL_CHUNK is mlx-lm's."""
    if not prompt:
        raise ValueError("the prompt has no tokens")
    if chunk < 1:
        raise ValueError(f"a prefill chunk needs at least one token, not {chunk}")
    head, flags, steps = prompt[:-1], NEW, []
    for i in range(0, len(head), chunk):
        steps.append((head[i : i + chunk], flags))
        flags = 0
    steps.append((prompt[-1:], flags | SAMPLE))
    return steps
