"""Every family whose mlx-lm model has shard() in tensor mode: a tiny random checkpoint made by
`mlxdist testing make-model`, every layer cut over 2 real local ranks by mlx-lm's own shard(),
answers with the same greedy tokens as one mlx-lm process on the same folder, and its
last-position logits agree within 1e-5. A dense and an MoE family whose heads divide by 3 run
on 3 ranks."""

from __future__ import annotations

import pytest
from conftest import assert_same_answer, assert_same_logits, local_cluster

pytestmark = pytest.mark.cluster

MAX_TOKENS = 8
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
    ("kimi_k2", 2, {}),
    ("qwen3", 3, {**_THREE, "intermediate_size": 192}),
    ("qwen3_moe", 3, {**_THREE, "intermediate_size": 192, "moe_intermediate_size": 96}),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}ranks")
def cluster(request, family_answer):
    """The family's tiny checkpoint on ranks in tensor mode, and one mlx-lm process's answer."""
    name, ranks, overrides = request.param
    overrides = {"torch_dtype": "float32", **overrides}
    path, _, reference = family_answer(name, QUESTION, MAX_TOKENS, overrides)
    with local_cluster(path, [1] * ranks, parallel="tensor") as (url, health):
        yield name, url, health, reference


def test_greedy_tokens_equal_single_process(cluster):
    name, url, health, reference = cluster
    assert_same_answer(url, reference, MAX_TOKENS, f"{name} tensor {health.get('split')}")


def test_last_logits_agree(cluster):
    name, url, health, reference = cluster
    assert_same_logits(url, reference, f"{name} tensor {health.get('split')}")
