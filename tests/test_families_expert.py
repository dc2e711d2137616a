"""Every mixture-of-experts family in expert mode: a tiny random checkpoint made by
`mlxdist testing make-model` (8 routed experts), its experts split unevenly over 2 and 3 real
local ranks, answers with the same greedy tokens as one mlx-lm process on the same folder, and its
last-position logits agree within 1e-5. Each family runs its own router and shared experts around
the ranks' LocalExperts (DeepSeek-V3's tuned layer has its own tests in test_expert.py)."""

from __future__ import annotations

import pytest
from conftest import assert_same_answer, assert_same_logits, local_cluster
from mlx.utils import tree_flatten

from quantize.nodes import is_routed_expert_tensor

pytestmark = pytest.mark.cluster

MAX_TOKENS = 8  # as test_families_pipeline, whose checkpoints and answers these share
QUESTION = "What is the capital of France?"
FAMILIES = ["qwen3_moe", "glm4_moe", "gpt_oss", "minimax", "deepseek_v32", "kimi_k2"]
EXPERTS = [[3, 5], [2, 3, 3]]  # routed experts per rank, of 8


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, family_answer):
    """The family's tiny checkpoint and one mlx-lm process's answer on it."""
    name = request.param
    path, model, reference = family_answer(name, QUESTION, MAX_TOKENS)
    params = tree_flatten(model.parameters())
    experts = sum(v.nbytes for k, v in params if is_routed_expert_tensor(k))
    return name, path, reference, experts


@pytest.fixture(scope="module", params=EXPERTS, ids=lambda e: "-".join(map(str, e)))
def cluster(request, family):
    name, path, reference, experts = family
    counts = request.param
    with local_cluster(path, [1] * len(counts), parallel="expert", experts=counts) as (
        url,
        health,
    ):
        yield name, url, health | {"expert_bytes": experts}, counts, reference


def test_each_rank_holds_only_its_experts(cluster):
    """Each rank's routed-expert bytes are its share of one process's: count / 8 of them."""
    name, _, health, counts, _ = cluster
    held = [len(node["experts"]) for node in health["nodes"]]
    weights = [node["expert_weights"] for node in health["nodes"]]
    print(f"{name}: experts per rank {held}, their bytes {weights} of {health['expert_bytes']}")
    assert held == counts
    assert health["expert_bytes"] > 0
    assert [w * sum(counts) for w in weights] == [c * health["expert_bytes"] for c in counts]


def test_greedy_tokens_equal_single_process(cluster):
    name, url, _, counts, reference = cluster
    assert_same_answer(url, reference, MAX_TOKENS, f"{name} experts {counts}")


def test_last_logits_agree(cluster):
    name, url, _, counts, reference = cluster
    assert_same_logits(url, reference, f"{name} experts {counts}")
