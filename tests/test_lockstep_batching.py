"""Continuous batching for ranks in lock step: concurrent answers decode together, unchanged.

Real rank processes and real HTTP, in expert mode (tiny-r1 on 2 ranks) and in tensor mode (a
tiny llama on 2 ranks): six requests with different prompts and lengths, joining at different
times while others decode, each get exactly the tokens they get alone (greedy, and one seeded
sample), and the ranks decoded several of them in one step.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from conftest import local_cluster

pytestmark = pytest.mark.cluster

# (prompt ids, max_tokens, sampling): lengths from one token to 100; ids below the tiny llama's 512
REQUESTS = [
    (list(range(300, 305)), 12, {}),
    (list(range(40, 80)), 9, {}),
    ([77], 10, {}),
    (list(range(400, 420)), 14, {"temperature": 1.0, "seed": 7}),  # its own sampler and key
    ([5, 9, 13, 17], 6, {}),
    (list(range(100, 500, 4)), 11, {}),
]
JOIN_AFTER = [0.0, 0.0, 0.1, 0.25, 0.4, 0.6]  # seconds: later ones join while others decode


@pytest.fixture(scope="module", params=["expert", "tensor"])
def cluster(request, tiny_r1, family_answer):
    if request.param == "expert":
        model = tiny_r1
    else:  # heads that divide by 2; float32 so the cut matmuls agree with one process's
        model, _, _ = family_answer("llama", "Hi", 1, {"torch_dtype": "float32"})
    # No prefix cache: its hits after the solo answers make the concurrent prompts so short
    # that they may no longer overlap enough to decode 3 at once (test_prefix_cache runs
    # concurrent answers with it in both modes).
    with local_cluster(model, [1, 1], parallel=request.param, prompt_cache_bytes=0) as (url, _):
        yield request.param, url


@pytest.fixture(scope="module")
def reference_model(cluster, tiny_r1_no_mtp, family_answer):
    """One mlx-lm process on the cluster's model, in float32 as the ranks run it."""
    import mlx.core as mx
    from mlx_lm import load

    if cluster[0] == "expert":
        model, _ = load(str(tiny_r1_no_mtp))
        model.set_dtype(mx.float32)  # CPU expert matmul runs only in float32
        return model
    return family_answer("llama", "Hi", 1, {"torch_dtype": "float32"})[1]


def _ids(url: str, prompt: list[int], max_tokens: int, sampling: dict) -> list[int]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, **sampling}
    r = httpx.post(url + "/v1/completions", json=body | {"return_token_ids": True}, timeout=300)
    r.raise_for_status()
    return r.json()["choices"][0]["token_ids"]


def test_concurrent_answers_equal_their_solo_answers(cluster):
    mode, url = cluster
    alone = [_ids(url, *request) for request in REQUESTS]
    together: list = [None] * len(REQUESTS)

    def ask(i: int) -> None:
        time.sleep(JOIN_AFTER[i])
        together[i] = _ids(url, *REQUESTS[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for (prompt, _, _), solo, mixed in zip(REQUESTS, alone, together):
        print(f"{mode} {len(prompt):3} prompt tokens: alone {solo} together {mixed}")
    assert together == alone
    assert [len(a) for a in alone] == [n for _, n, _ in REQUESTS]
    stats = httpx.get(url + "/mlxdist/stats", timeout=60).json()
    print(f"{mode}: at most {stats['in_flight_peak']} sequences in one decode step")
    # they decoded together, not one after another (3 or more at once on an idle machine; on a
    # loaded one the first answers may end before the last join, so 2 is what is certain)
    assert stats["in_flight_peak"] >= 2
    for rank in stats["ranks"]:
        assert rank["open_caches"] <= 1, rank  # every finished answer's caches are freed


# (prompt ids, tokens, extras): bias, penalties and log probabilities, asked together in the batch
EXTRAS = [
    ([5, 9, 13, 17, 21], 6, {"logprobs": 3}),
    ([40, 41, 42, 43], 8, {"repetition_penalty": 1.5, "presence_penalty": 0.5}),
    ([300, 301, 302], 5, {"logit_bias": {"77": 100.0}}),
    (list(range(100, 130)), 7, {"frequency_penalty": 1.2, "logprobs": 0}),
]


def test_sampling_extras_in_the_batch_equal_mlx_lm(cluster, reference_model):
    """Bias, penalties and log probabilities on rank 0 (which samples in lock step), for
    sequences decoding together: each answer is one mlx-lm process's under mlx-lm's own
    processors, and the log probabilities are its log-softmax within 1e-4."""
    from sampling_reference import assert_logprobs_match, cluster_answer, mlx_lm_answer

    mode, url = cluster
    together: list = [None] * len(EXTRAS)

    def steps() -> int:
        return httpx.get(url + "/mlxdist/stats", timeout=60).json()["ranks"][0]["steps"]

    def ask(i: int) -> None:
        time.sleep(0.02 * i)
        together[i] = cluster_answer(url, *EXTRAS[i])

    before = steps()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(EXTRAS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for (prompt, n, extras), choice in zip(EXTRAS, together):
        expected, rows = mlx_lm_answer(reference_model, prompt, n, extras)
        print(f"{mode} {extras}: {choice['token_ids']} (mlx-lm {expected})")
        assert choice["token_ids"] == expected
        if "logprobs" in extras:
            assert_logprobs_match(choice, rows, extras["logprobs"])
    assert together[2]["token_ids"] == [77] * 5  # the bias decides
    # One step a token each alone (the prompt's step gives the first): fewer when they shared
    # batched steps, each row sampled with its own extras.
    taken, alone = steps() - before, sum(n for _, n, _ in EXTRAS)
    print(f"{mode}: {taken} steps for {alone} tokens")
    assert taken < alone
