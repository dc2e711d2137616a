"""The split changes nothing: a local cluster's greedy tokens and logits equal one mlx-lm process.

Real rank processes over MLX's ring backend on loopback, for tiny-r1 (R1's format, with its
multi-token-prediction layer) and SmolLM2 (imported from GGUF), with even and uneven splits.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import cluster_logits, complete_ids, greedy_reference, local_cluster
from mlx_lm import load

pytestmark = pytest.mark.cluster

MAX_TOKENS = 16
QUESTION = "What is the capital of France?"

CASES = [
    ("smollm2", [15, 15]),
    ("smollm2", [8, 10, 12]),
    ("tiny_r1", [2, 2]),
    ("tiny_r1", [2, 1, 1]),
]


@pytest.fixture(scope="module")
def references(request):
    """Single-process mlx-lm models, loaded once per module."""
    return {}


def reference(name: str, request, refs: dict):
    if name == "smollm2":
        return request.getfixturevalue("smollm2_reference")  # the same, made once (conftest)
    if name not in refs:
        # tiny-r1's MTP layer sits at index num_hidden_layers, which mlx-lm's sanitize does not
        # drop: the reference loads the same weights written without it.
        path = request.getfixturevalue("tiny_r1_no_mtp" if name == "tiny_r1" else name)
        model, tokenizer = load(str(path))
        if name == "tiny_r1":
            model.set_dtype(mx.float32)  # CPU expert matmul runs only in float32
        refs[name] = greedy_reference(model, tokenizer, QUESTION, MAX_TOKENS)
    return refs[name]


# The cases whose cluster other files start too: the session's shared one (conftest).
SHARED = {
    ("smollm2", (15, 15)): "shared_smollm2",
    ("tiny_r1", (2, 2)): "shared_r1",
    ("tiny_r1", (2, 1, 1)): "shared_r1_3",
}


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{'-'.join(map(str, c[1]))}")
def cluster(request, references):
    name, split = request.param
    if shared := SHARED.get((name, tuple(split))):
        url, health, _ = request.getfixturevalue(shared)
        yield name, url, health
        return
    model = request.getfixturevalue(name)
    with local_cluster(model, split) as (url, health):
        yield name, url, health


def test_greedy_tokens_equal_single_process(cluster, request, references):
    name, url, health = cluster
    prompt, expected, _ = reference(name, request, references)
    got = complete_ids(url, prompt, MAX_TOKENS)
    print(f"{name} split {health['split']}: {got}")
    assert len(expected) >= 4, "the reference should produce a real answer"
    assert got == expected


def test_last_logits_agree(cluster, request, references):
    name, url, health = cluster
    prompt, _, expected = reference(name, request, references)
    got = np.array(cluster_logits(url, prompt), dtype=np.float32)
    diff = float(np.max(np.abs(got - expected)))
    print(f"{name} split {health['split']}: max |logit difference| = {diff:.3g}")
    assert got.shape == expected.shape
    assert diff <= 1e-5
