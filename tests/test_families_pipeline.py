"""Every supported family in pipeline mode: a tiny random checkpoint made by
`mlxdist testing make-model`, run on 2 and 3 real local ranks, answers with the same greedy tokens
as one mlx-lm process on the same folder, and its last-position logits agree within 1e-5."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import cluster_logits, complete_ids, greedy_reference, local_cluster

pytestmark = pytest.mark.cluster

MAX_TOKENS = 12
QUESTION = "What is the capital of France?"
FAMILIES = [
    "llama",
    "mistral",
    "qwen3",
    "qwen3_moe",
    "glm4_moe",
    "minimax",
    "deepseek_v32",
    "gpt_oss",
]
SPLITS = [[2, 2], [1, 2, 1]]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """The family's tiny checkpoint and one mlx-lm process's answer on it."""
    from mlx_lm import load

    from mlxdist.runtime.stage import run_dtype
    from mlxdist.testing.make_model import make_model

    name = request.param
    path = make_model(name, tmp_path_factory.mktemp("families") / name)
    model, tokenizer = load(str(path))
    if (dtype := run_dtype(json.loads((path / "config.json").read_text()))) is not None:
        model.set_dtype(dtype)  # as every rank runs it
    return name, path, greedy_reference(model, tokenizer, QUESTION, MAX_TOKENS)


@pytest.fixture(scope="module", params=SPLITS, ids=lambda s: "-".join(map(str, s)))
def cluster(request, family):
    name, path, reference = family
    with local_cluster(path, request.param) as (url, health):
        yield name, url, health, reference


def test_greedy_tokens_equal_single_process(cluster):
    name, url, health, (prompt, expected, _) = cluster
    got = complete_ids(url, prompt, MAX_TOKENS)
    print(f"{name} split {health['split']}: {got}")
    assert len(expected) >= 4, "the reference should produce a real answer"
    assert got == expected


def test_last_logits_agree(cluster):
    name, url, health, (prompt, _, expected) = cluster
    got = np.array(cluster_logits(url, prompt), dtype=np.float32)
    diff = float(np.max(np.abs(got - expected)))
    print(f"{name} split {health['split']}: max |logit difference| = {diff:.3g}")
    assert got.shape == expected.shape
    assert diff <= 1e-5
