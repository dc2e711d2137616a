"""Every supported family in pipeline mode: a tiny random checkpoint made by
`mlxdist testing make-model`, run on 2 and 3 real local ranks, answers with the same greedy tokens
as one mlx-lm process on the same folder, and its last-position logits agree within 1e-5."""

from __future__ import annotations

import pytest
from conftest import assert_same_answer, assert_same_logits, local_cluster

from mlxdist.testing.families import family_names

pytestmark = pytest.mark.cluster

MAX_TOKENS = 8
QUESTION = "What is the capital of France?"
FAMILIES = family_names()  # every family make-model writes
SPLITS = [[2, 2], [1, 2, 1]]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, family_answer):
    """The family's tiny checkpoint and one mlx-lm process's answer on it."""
    name = request.param
    path, _, reference = family_answer(name, QUESTION, MAX_TOKENS)
    return name, path, reference


@pytest.fixture(scope="module", params=SPLITS, ids=lambda s: "-".join(map(str, s)))
def cluster(request, family):
    name, path, reference = family
    with local_cluster(path, request.param) as (url, health):
        yield name, url, health, reference


def test_greedy_tokens_equal_single_process(cluster):
    name, url, health, reference = cluster
    assert_same_answer(url, reference, MAX_TOKENS, f"{name} split {health['split']}")


def test_last_logits_agree(cluster):
    name, url, health, reference = cluster
    assert_same_logits(url, reference, f"{name} split {health['split']}")
