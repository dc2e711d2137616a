"""The prefix cache through real ranks, in every parallel mode: two conversations of several turns
that share their first 150 tokens, the first turns at once (the second may start from the first
while it runs), with a budget so small that every kept answer evicts another. Every answer must
be one mlx-lm process's greedy answer to the same prompt, the follow-up turns must have started
from cached tokens, every rank must hold the same entries and none more bytes than the budget.
"""

from __future__ import annotations

import json
import threading

import httpx
import mlx.core as mx
import pytest
from conftest import local_cluster
from mlx_lm import load
from mlx_lm.generate import generate_step

pytestmark = pytest.mark.cluster

ANSWER = 6  # tokens per answer
SHARED = list(range(10, 160))  # both conversations start with these
FIRST = {"a": SHARED + list(range(160, 210)), "b": SHARED + list(range(500, 550))}
USER = {"a": [list(range(600, 620)), list(range(620, 640))], "b": [list(range(700, 720))]}
# tiny-r1 caches 384 bytes per token per layer (MLA's latent and rotary key, float32); room for
# about 330 tokens on the rank with the most layers: one conversation's entry, not two.
BYTES_PER_TOKEN_LAYER = 384
ROOM = 330

MODES = {
    "pipeline-3": ([2, 1, 1], {}, 2),  # a middle rank passes the commands on
    "one-rank": ([4], {}, 4),
    "expert-2": ([2, 2], {"parallel": "expert"}, 4),
    "tensor-2": ([2, 2], {"parallel": "tensor"}, 4),
}


@pytest.fixture(scope="module")
def mlx_lm_answer(tiny_r1_no_mtp):
    model, _ = load(str(tiny_r1_no_mtp))
    model.set_dtype(mx.float32)  # as every rank runs it (CPU expert matmul: float32 only)
    made: dict = {}

    def answer(prompt: list[int]) -> list[int]:
        if tuple(prompt) not in made:
            steps = generate_step(mx.array(prompt), model, max_tokens=ANSWER)
            made[tuple(prompt)] = [int(t) for t, _ in steps]
        return made[tuple(prompt)]

    return answer


def _ask_streamed(url: str, prompt: list[int], when_started) -> tuple[list[int], int]:
    """_ask, streamed, calling when_started() once the first token has come."""
    body = {"prompt": prompt, "max_tokens": ANSWER, "temperature": 0.0, "ignore_eos": True}
    body |= {"stream": True, "return_token_ids": True, "stream_options": {"include_usage": True}}
    tokens, cached = [], None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices") or []:
                if choice.get("token_ids"):
                    if not tokens:
                        when_started()
                    tokens += choice["token_ids"]
            if event.get("usage"):
                cached = event["usage"]["prompt_tokens_details"]["cached_tokens"]
    return tokens, cached


def _ask(url: str, prompt: list[int]) -> tuple[list[int], int]:
    body = {"prompt": prompt, "max_tokens": ANSWER, "temperature": 0.0, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body | {"return_token_ids": True}, timeout=300)
    r.raise_for_status()
    out = r.json()
    return out["choices"][0]["token_ids"], out["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.mark.parametrize("mode", list(MODES))
def test_conversations_equal_mlx_lm_with_evictions_and_ranks_agree(
    mode, tiny_r1_no_mtp, mlx_lm_answer
):
    split, options, layers = MODES[mode]
    budget = ROOM * BYTES_PER_TOKEN_LAYER * layers
    with local_cluster(tiny_r1_no_mtp, split, prompt_cache_bytes=budget, **options) as (url, _):
        prompts = dict(FIRST)
        got: dict = {}

        def first_turn(name: str) -> None:
            got[name] = _ask(url, prompts[name])

        # b's first turn is sent once a's has streamed its first token: it starts from a's
        # caches while a still runs (or from a's entry, if a has just finished)
        second = threading.Thread(target=first_turn, args=("b",))
        got["a"] = _ask_streamed(url, prompts["a"], when_started=second.start)
        second.join()
        assert got["b"][1] >= len(SHARED)
        cached = []
        for name in ("a", "b"):
            assert got[name][0] == mlx_lm_answer(prompts[name]), (mode, name, 1)
        # the follow-up turns, one after another: each kept answer evicts the other's entry
        held = []  # tokens the conversation's last entry holds: its prompt and answer but one
        for turn, name in [(2, "a"), (3, "a"), (2, "b")]:
            held.append(len(prompts[name]) + ANSWER - 1)
            prompts[name] = prompts[name] + got[name][0] + USER[name][turn - 2]
            got[name] = _ask(url, prompts[name])
            assert got[name][0] == mlx_lm_answer(prompts[name]), (mode, name, turn)
            cached.append(got[name][1])
        print(f"{mode}: cached tokens of the follow-up turns {cached}")
        assert all(n >= len(SHARED) for n in cached)
        assert cached[1] == held[1]  # a's third turn: all of its second turn's entry
        stats = httpx.get(url + "/mlxdist/stats", timeout=60).json()
    index, ranks = stats["prefix_cache"], stats["ranks"]
    print(f"{mode}: index {index}; ranks {ranks}")
    assert index["evictions"] >= 2 and index["hits"] >= 3
    assert 1 <= index["entries"] and index["bytes"] <= budget
    for rank in ranks:
        assert (rank["prefix_entries"], rank["prefix_digest"]) == (
            ranks[0]["prefix_entries"],
            ranks[0]["prefix_digest"],
        )
        assert rank["prefix_entries"] == index["entries"]
        assert 0 < rank["prefix_bytes"] <= budget


def test_sliding_windows_are_reused_only_whole(tmp_path_factory):
    """gpt-oss's sliding-window layers (a window of 8 in the tiny model) wrap within a prompt:
    an entry serves a follow-up turn that holds it whole, never a prompt that leaves it midway,
    and the answers are mlx-lm's either way."""
    from conftest import family_model

    path, model, _ = family_model("gpt_oss", tmp_path_factory.mktemp("families") / "gpt_oss")

    def reference(prompt: list[int]) -> list[int]:
        return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=ANSWER)]

    first = list(range(10, 60))
    with local_cluster(path, [2, 2]) as (url, _):
        answer, cached = _ask(url, first)
        assert (answer, cached) == (reference(first), 0)
        follow = first + answer + list(range(300, 310))
        answer2, cached2 = _ask(url, follow)
        assert answer2 == reference(follow)
        assert cached2 == len(first) + ANSWER - 1  # the whole first entry
        apart = first[:30] + list(range(400, 420))  # leaves every entry at token 30
        answer3, cached3 = _ask(url, apart)
        assert (answer3, cached3) == (reference(apart), 0)
        # nor does such a model speculate: rejected drafts could not leave a filled window
        body = {"prompt": follow, "max_tokens": ANSWER, "temperature": 0.0, "ignore_eos": True}
        body |= {"speculative": "ngram", "return_token_ids": True}
        out = httpx.post(url + "/v1/completions", json=body, timeout=300).json()
        assert out["choices"][0]["token_ids"] == answer2
        assert "speculative" not in out["usage"]
