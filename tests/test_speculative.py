"""Speculative decoding with prompt lookup through real ranks: on 1, 2 and 3 pipeline ranks, with
different draft lengths, every greedy answer equals one mlx-lm process's (so equals decoding
without speculation), while drafts were both accepted and rejected along the way."""

from __future__ import annotations

import threading

import httpx
import mlx.core as mx
import pytest
from conftest import local_cluster
from mlx_lm import load
from mlx_lm.generate import generate_step

pytestmark = pytest.mark.cluster

ANSWER = 20
LOOP = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
PROMPTS = [
    LOOP * 6,  # tiny-r1 falls into repeating what it has seen: drafts accepted whole
    list(range(30, 90)),  # nothing repeats at first: no drafts, then rejections
    LOOP * 2 + list(range(200, 230)),
]
SPLITS = {"one-rank": ([4], 3), "2-ranks": ([2, 2], 4), "3-ranks": ([2, 1, 1], 6)}


@pytest.fixture(scope="module")
def mlx_lm_answers(tiny_r1_no_mtp):
    model, _ = load(str(tiny_r1_no_mtp))
    model.set_dtype(mx.float32)  # as the ranks run it (CPU expert matmul: float32 only)
    return [
        [int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=ANSWER)] for p in PROMPTS
    ]


def _answer(url: str, prompt: list[int], **extra) -> list[int]:
    body = {"prompt": prompt, "max_tokens": ANSWER, "temperature": 0.0, "ignore_eos": True}
    body |= extra
    r = httpx.post(url + "/v1/completions", json=body | {"return_token_ids": True}, timeout=300)
    r.raise_for_status()
    return r.json()["choices"][0]["token_ids"]


@pytest.mark.parametrize("ranks", list(SPLITS))
def test_greedy_answers_equal_without_speculation(ranks, tiny_r1_no_mtp, mlx_lm_answers):
    split, k = SPLITS[ranks]
    api = {"speculative": "ngram", "draft_tokens": k}
    with local_cluster(tiny_r1_no_mtp, split, api=api) as (url, _):
        alone = [_answer(url, p) for p in PROMPTS]
        together: dict[int, list[int]] = {}  # at once too, where the ring interleaves them

        def ask(i: int) -> None:
            together[i] = _answer(url, PROMPTS[i])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        figures = httpx.get(url + "/mlxdist/stats", timeout=60).json()["speculative"]
        # a request's own settings: off, or another draft length
        off = _answer(url, PROMPTS[0], speculative="none")
        after_off = httpx.get(url + "/mlxdist/stats", timeout=60).json()["speculative"]
        two = _answer(url, PROMPTS[0], draft_tokens=2)
        after_two = httpx.get(url + "/mlxdist/stats", timeout=60).json()["speculative"]
    print(f"{ranks}, {k} drafts: {figures}")
    assert off == two == mlx_lm_answers[0]
    assert after_off["passes"] == figures["passes"]
    passes = after_two["passes"] - after_off["passes"]
    assert 0 < passes and after_two["drafted"] - after_off["drafted"] <= 2 * passes
    assert alone == mlx_lm_answers
    assert [together[i] for i in range(len(PROMPTS))] == mlx_lm_answers
    assert figures["mode"] == "ngram" and figures["draft_tokens"] == k
    assert 0 < figures["accepted"] < figures["drafted"]  # accepted, and rejected
    assert figures["tokens_per_pass"] > 1.0
