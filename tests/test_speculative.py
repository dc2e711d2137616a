"""Speculative decoding through real ranks, by R1's MTP layer and by prompt lookup: on 1, 2 and 3
pipeline ranks, with different draft lengths, alone and interleaved, every greedy answer equals
one mlx-lm process's (so equals decoding without speculation), while drafts were accepted whole
and rejected at their first token along the way; a new answer's caches on every rank equal plain
decoding's."""

from __future__ import annotations

import threading

import httpx
import mlx.core as mx
import pytest
from conftest import local_cluster
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from mlxdist.runtime.prefix_store import checksum

pytestmark = pytest.mark.cluster

ANSWER = 20
LOOP = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
PROMPTS = [
    LOOP * 6,  # tiny-r1 falls into repeating what it has seen: drafts accepted whole
    list(range(30, 90)),  # nothing repeats at first: no drafts, then rejections
    LOOP * 2 + list(range(200, 230)),
]
FRESH = [20, 21, 22, 23, 24, 25] * 7 + [40, 41, 42]  # asked last, its answer's caches compared
# split, prompt lookup's drafts, the MTP layer's
SPLITS = {"one-rank": ([4], 3, 1), "2-ranks": ([2, 2], 4, 2), "3-ranks": ([2, 1, 1], 6, 3)}


@pytest.fixture(scope="module")
def mlx_lm_model(tiny_r1_no_mtp):
    model, _ = load(str(tiny_r1_no_mtp))
    model.set_dtype(mx.float32)  # as the ranks run it (CPU expert matmul: float32 only)
    return model


@pytest.fixture(scope="module")
def mlx_lm_answers(mlx_lm_model):
    def answer(prompt: list[int]) -> list[int]:
        steps = generate_step(mx.array(prompt), mlx_lm_model, max_tokens=ANSWER)
        return [int(t) for t, _ in steps]

    return [answer(p) for p in [*PROMPTS, FRESH]]


@pytest.fixture(scope="module")
def reference_cache(mlx_lm_model):
    """Plain decoding's KV caches (one mlx-lm process, every layer) after FRESH's answer."""
    cache = make_prompt_cache(mlx_lm_model)
    for _ in generate_step(mx.array(FRESH), mlx_lm_model, max_tokens=ANSWER, prompt_cache=cache):
        pass
    return cache


def _answer(url: str, prompt: list[int], usage: dict | None = None, **extra) -> list[int]:
    body = {"prompt": prompt, "max_tokens": ANSWER, "temperature": 0.0, "ignore_eos": True}
    body |= extra
    r = httpx.post(url + "/v1/completions", json=body | {"return_token_ids": True}, timeout=300)
    r.raise_for_status()
    if usage is not None:
        usage |= r.json()["usage"]
    return r.json()["choices"][0]["token_ids"]


def _figures(url: str) -> dict:
    return httpx.get(url + "/mlxdist/stats", timeout=60).json()


@pytest.mark.parametrize("ranks", list(SPLITS))
def test_greedy_answers_equal_without_speculation(
    ranks, tiny_r1_repeat_mtp, mlx_lm_answers, reference_cache
):
    """The server drafts with the MTP layer (which repeats the token just chosen, so tiny-r1's
    runs of one token accept whole and the rest reject); requests ask prompt lookup too."""
    split, k, k_mtp = SPLITS[ranks]
    modes = {"mtp": {}, "ngram": {"speculative": "ngram", "draft_tokens": k}}
    with local_cluster(tiny_r1_repeat_mtp, split, speculative="mtp", draft_tokens=k_mtp) as (
        url,
        _,
    ):
        alone, passes = {}, {}
        for mode, extra in modes.items():
            before = _figures(url)["speculative"]
            alone[mode] = [_answer(url, p, **extra) for p in PROMPTS]
            after = _figures(url)["speculative"]
            keys = ("passes_all_accepted", "passes_none_accepted")
            passes[mode] = [after[key] - before[key] for key in keys]
        together: dict[int, list[int]] = {}  # at once too, where the ring interleaves them

        def ask(i: int) -> None:  # the modes mixed in the ring
            together[i] = _answer(url, PROMPTS[i], **list(modes.values())[i % 2])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        figures = _figures(url)["speculative"]
        # a request's own settings: off, or another draft length
        off = _answer(url, PROMPTS[0], speculative="none")
        after_off = _figures(url)["speculative"]
        two = _answer(url, PROMPTS[0], speculative="ngram", draft_tokens=2)
        after_two = _figures(url)["speculative"]
        # a new answer's caches on every rank, kept by the prefix cache, against plain decoding's
        before = _figures(url)
        usage: dict = {}
        fresh = _answer(url, FRESH, usage)
        after = _figures(url)
    print(f"{ranks}, ngram {k} / mtp {k_mtp} drafts: {figures}, all/none accepted {passes}")
    assert fresh == mlx_lm_answers[-1]
    drafted = after["speculative"]["drafted"] - before["speculative"]["drafted"]
    accepted = after["speculative"]["accepted"] - before["speculative"]["accepted"]
    assert 0 < accepted < drafted  # its MTP drafts were accepted and rejected
    assert (usage["speculative"]["drafted"], usage["speculative"]["accepted"]) == (
        drafted,
        accepted,
    )
    start = 0
    for rank, layers in enumerate(split):
        got = after["ranks"][rank]["prefix_checksum"] - before["ranks"][rank]["prefix_checksum"]
        want = 1000 * checksum(reference_cache[start : start + layers], len(FRESH) + ANSWER - 1)
        print(f"rank {rank}: caches' checksum {got / 1000:.3f}, plain decoding's {want / 1000:.3f}")
        assert abs(got - want) <= 1e-4 * want
        start += layers
    assert off == two == mlx_lm_answers[0]
    assert after_off["passes"] == figures["passes"]
    passes_two = after_two["passes"] - after_off["passes"]
    assert 0 < passes_two and after_two["drafted"] - after_off["drafted"] <= 2 * passes_two
    for mode in modes:
        assert alone[mode] == mlx_lm_answers[: len(PROMPTS)], mode
        assert all(n > 0 for n in passes[mode]), passes  # drafts accepted whole, rejected first
    assert [together[i] for i in range(len(PROMPTS))] == mlx_lm_answers[: len(PROMPTS)]
    assert figures["mode"] == "mtp" and figures["draft_tokens"] == k_mtp
    assert figures["tokens_per_pass"] > 1.0
