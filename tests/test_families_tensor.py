"""Every family whose mlx-lm model has shard() in tensor mode: a tiny random checkpoint made by
`mlxdist testing make-model`, every layer cut over 2 real local ranks by mlx-lm's own shard(),
answers with the same greedy tokens as one mlx-lm process on the same folder, and its
last-position logits agree within 1e-5. A dense and an MoE family whose heads divide by 3 run
on 3 ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import cluster_logits, complete_ids, greedy_reference, local_cluster

pytestmark = pytest.mark.cluster

MAX_TOKENS = 12
QUESTION = "What is the capital of France?"
# (family, ranks, config overrides): the tiny models have 4 query heads and 2 or 4 KV heads,
# so 3 ranks need a model with 6 and 3 (and an MLP width that divides by 3). Stored in
# float32: a cut matmul sums its halves in another order, which bfloat16 would round to
# differences near 1e-2.
_THREE = {"num_attention_heads": 6, "num_key_value_heads": 3}
CASES = [
    ("llama", 2, {}),
    ("mistral", 2, {}),
    ("qwen3", 2, {}),
    ("qwen3_moe", 2, {}),
    ("glm4_moe", 2, {}),
    ("minimax", 2, {}),
    ("deepseek_v32", 2, {}),
    ("gpt_oss", 2, {}),
    ("qwen3", 3, {**_THREE, "intermediate_size": 192}),
    ("qwen3_moe", 3, {**_THREE, "intermediate_size": 192, "moe_intermediate_size": 96}),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}ranks")
def cluster(request, tmp_path_factory):
    """The family's tiny checkpoint on ranks in tensor mode, and one mlx-lm process's answer."""
    from mlx_lm import load

    from mlxdist.runtime.stage import run_dtype
    from mlxdist.testing.make_model import make_model

    name, ranks, overrides = request.param
    folder = tmp_path_factory.mktemp("tensor") / f"{name}-{ranks}"
    path = make_model(name, folder, overrides={"torch_dtype": "float32", **overrides})
    model, tokenizer = load(str(path))
    if (dtype := run_dtype(json.loads((path / "config.json").read_text()))) is not None:
        model.set_dtype(dtype)  # as every rank runs it
    reference = greedy_reference(model, tokenizer, QUESTION, MAX_TOKENS)
    del model
    with local_cluster(path, [1] * ranks, parallel="tensor") as (url, health):
        yield name, url, health, reference


def test_greedy_tokens_equal_single_process(cluster):
    name, url, health, (prompt, expected, _) = cluster
    got = complete_ids(url, prompt, MAX_TOKENS)
    print(f"{name} tensor {health.get('split')}: {got}")
    assert len(expected) >= 4, "the reference should produce a real answer"
    assert got == expected


def test_last_logits_agree(cluster):
    name, url, health, (prompt, _, expected) = cluster
    got = np.array(cluster_logits(url, prompt), dtype=np.float32)
    diff = float(np.max(np.abs(got - expected)))
    print(f"{name} tensor {health.get('split')}: max |logit difference| = {diff:.3g}")
    assert got.shape == expected.shape
    assert diff <= 1e-5
