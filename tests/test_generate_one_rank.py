"""One rank decodes with the next step queued while the current one computes (as mlx-lm does):
the tokens are still exactly a single mlx-lm process's."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step

from mlxdist.runtime.pipeline import Runner
from mlxdist.runtime.stage import load_stage
from mlxdist.serving.generate import generate_tokens

PROMPT = "Once upon a time"


MOST = 24  # the longest case


@pytest.fixture(scope="module")
def mlx_lm_tokens():
    """(prompt, mlx-lm's first MOST greedy tokens) for a model, loaded and generated once: a
    shorter case's tokens are their first ones (greedy decoding is the same to any length)."""
    made = {}

    def tokens(request, name: str) -> tuple[list[int], list[int]]:
        if name not in made:
            reference = request.getfixturevalue("tiny_r1_no_mtp" if name == "tiny_r1" else name)
            model, tokenizer = load(str(reference))
            if name == "tiny_r1":
                model.set_dtype(mx.float32)  # CPU expert matmul runs only in float32
            prompt = tokenizer.encode(PROMPT)
            made[name] = (
                prompt,
                [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=MOST)],
            )
        return made[name]

    return tokens


@pytest.mark.parametrize("name", ["smollm2", "tiny_r1"])
@pytest.mark.parametrize("max_tokens", [1, 2, MOST])
def test_one_rank_tokens_equal_mlx_lm(request, mlx_lm_tokens, name, max_tokens):
    path = request.getfixturevalue(name)
    prompt, most = mlx_lm_tokens(request, name)
    expected = most[:max_tokens]
    assert len(expected) == max_tokens

    stage = load_stage(path, [stage_layers(path)], 0)
    runner = Runner(stage, mx.distributed.init(backend="any"))
    assert runner.size == 1
    assert list(generate_tokens(runner, prompt, max_tokens)) == expected
    # and again: a new sequence starts from a fresh cache
    assert list(generate_tokens(runner, prompt, max_tokens)) == expected


def stage_layers(path) -> int:
    from quantize.checkpoint import inspect_model

    return inspect_model(path).num_layers
