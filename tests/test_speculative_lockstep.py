"""Speculative decoding with prompt lookup on ranks in lock step: expert mode (tiny-r1 on 2 ranks)
and tensor mode (a tiny llama on 2 ranks). Every greedy answer equals one mlx-lm process's and
the same request's without speculation (tokens and text), for 1 and 4 drafts per step, alone and
beside a request that does not speculate (which decodes batched meanwhile); drafts were accepted
whole and rejected at their first token; after rejections every rank's caches hold exactly what
plain decoding's hold."""

from __future__ import annotations

import threading
import time

import httpx
import mlx.core as mx
import pytest
from conftest import local_cluster
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

pytestmark = pytest.mark.cluster

ANSWER = 20
LOOP = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
PROMPTS = [  # ids below the tiny llama's 512
    LOOP * 6,  # repeats: prompt lookup drafts from the first step
    list(range(30, 90)),  # nothing repeats at first
    LOOP * 2 + list(range(200, 230)),
]
FRESH = [20, 21, 22, 23, 24, 25] * 7 + [40, 41, 42]  # asked last, its answer's caches compared


@pytest.fixture(scope="module", params=["expert", "tensor"])
def cluster(request, tiny_r1_no_mtp, tiny_r1_repeat_mtp, family_answer):
    """(mode, url, mlx-lm's model): 2 ranks in lock step. Expert mode drafts with tiny-r1's MTP
    layer made to repeat the token just chosen (2 drafts by default; tiny-r1's runs of one token
    accept whole); tensor mode (a llama: no MTP layer) by prompt lookup, 4 by default."""
    if request.param == "expert":
        path = tiny_r1_repeat_mtp
        model, _ = load(str(tiny_r1_no_mtp))  # the same weights but the MTP layer
        model.set_dtype(mx.float32)  # as the ranks run it (CPU expert matmul: float32 only)
        settings = {"speculative": "mtp", "draft_tokens": 2}
    else:  # heads that divide by 2; float32 so the cut matmuls agree with one process's
        path, model, _ = family_answer("llama", "Hi", 1, {"torch_dtype": "float32"})
        settings = {"speculative": "ngram", "draft_tokens": 4}
    with local_cluster(path, [1, 1], parallel=request.param, **settings) as (url, _):
        yield request.param, url, model


def _answer(url: str, prompt: list[int], **extra) -> dict:
    """The completion's token ids, text and usage."""
    body = {"prompt": prompt, "max_tokens": ANSWER, "temperature": 0.0, "ignore_eos": True}
    body |= extra | {"return_token_ids": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return {"ids": choice["token_ids"], "text": choice["text"], "usage": r.json()["usage"]}


def _plain(model, prompt: list[int], cache=None) -> list[int]:
    steps = generate_step(mx.array(prompt), model, max_tokens=ANSWER, prompt_cache=cache)
    return [int(t) for t, _ in steps]


def _share(cache, rank: int, size: int, length: int) -> float:
    """The sum of magnitudes of what rank holds of one layer's cache from one process: its part
    of the heads when they divide among the ranks (tensor mode), all of a latent cache (MLA)."""
    total = 0.0
    for x in (cache.keys, cache.values):
        heads = x.shape[1]
        if heads > 1 and heads % size == 0:
            x = x[:, rank * heads // size : (rank + 1) * heads // size]
        total += mx.sum(mx.abs(x[..., :length, :].astype(mx.float32))).item()
    return total


def test_greedy_answers_equal_plain_decoding(cluster):
    mode, url, model = cluster
    want = [_plain(model, p) for p in PROMPTS]
    settings = {
        "none": {"speculative": "none"},
        "ngram-4": {"speculative": "ngram", "draft_tokens": 4},
        "ngram-1": {"speculative": "ngram", "draft_tokens": 1},
    }
    if mode == "expert":  # the server's own: the MTP layer, 2 drafts or 1
        settings |= {"mtp-2": {}, "mtp-1": {"draft_tokens": 1}}
    runs, passes = {}, {}  # setting -> answers; -> its passes all accepted, none accepted
    for setting, extra in settings.items():
        before = httpx.get(url + "/mlxdist/stats", timeout=60).json()["speculative"]
        runs[setting] = [_answer(url, p, **extra) for p in PROMPTS]
        after = httpx.get(url + "/mlxdist/stats", timeout=60).json()["speculative"]
        keys = ("passes_all_accepted", "passes_none_accepted")
        passes[setting] = [after[k] - before[k] for k in keys]
    for setting, answers in runs.items():
        figures = [a["usage"].get("speculative") for a in answers]
        print(f"{mode} {setting}: {figures}, passes all/none accepted {passes[setting]}")
        assert [a["ids"] for a in answers] == want, setting
        assert [a["text"] for a in answers] == [a["text"] for a in runs["none"]], setting
    assert all("speculative" not in a["usage"] for a in runs["none"])
    assert passes["none"] == [0, 0]
    # Drafts accepted whole and rejected at their first token, with 1 and with more per pass.
    drafting = [s for s in settings if s != "none"]
    assert all(n > 0 for s in drafting for n in passes[s]), passes
    ones = [a["usage"]["speculative"] for a in runs["ngram-1"] if "speculative" in a["usage"]]
    assert all(u["drafted"] == u["passes"] for u in ones)
    assert sum(u["passes"] for u in ones) == sum(passes["ngram-1"])  # each pass one or other
    fours = [a["usage"]["speculative"] for a in runs["ngram-4"] if "speculative" in a["usage"]]
    assert any(u["drafted"] > u["passes"] for u in fours)  # several drafts in some passes

    # At once: a speculating answer beside one that does not (while both decode, they decode
    # batched: drafts pay only for a sequence alone), both exact.
    # The one that does not speculate asks 5x as many tokens and goes first, so they overlap.
    together: dict[int, dict] = {}
    asks = [(2, {"speculative": "none", "max_tokens": 5 * ANSWER}), (0, {})]

    def ask(i: int, extra: dict) -> None:
        together[i] = _answer(url, PROMPTS[i], **extra)

    threads = [threading.Thread(target=ask, args=a) for a in asks]
    for t in threads:
        t.start()
        time.sleep(0.3)
    for t in threads:
        t.join(300)
    assert together[0]["ids"] == want[0] and together[2]["ids"][:ANSWER] == want[2]
    assert "speculative" not in together[2]["usage"]
    peak = httpx.get(url + "/mlxdist/stats", timeout=60).json()["in_flight_peak"]
    assert peak >= 2  # the speculating answer decoded in the batch beside the other


def test_caches_after_rejections_equal_plain_decoding(cluster):
    """A new answer's caches on every rank, kept by the prefix cache, against one process's."""
    mode, url, model = cluster
    reference = make_prompt_cache(model)
    want_ids = _plain(model, FRESH, reference)
    before = httpx.get(url + "/mlxdist/stats", timeout=60).json()
    fresh = _answer(url, FRESH)
    after = httpx.get(url + "/mlxdist/stats", timeout=60).json()
    assert fresh["ids"] == want_ids
    usage = fresh["usage"]["speculative"]
    print(f"{mode} fresh: {usage}")
    assert 0 < usage["accepted"] < usage["drafted"]  # drafts accepted and rejected
    length = len(FRESH) + ANSWER - 1
    size = len(after["ranks"])
    for rank in range(size):
        got = after["ranks"][rank]["prefix_checksum"] - before["ranks"][rank]["prefix_checksum"]
        want = 1000 * sum(_share(c, rank, size, length) for c in reference)
        print(f"{mode} rank {rank}: caches' checksum {got / 1000:.3f}, plain {want / 1000:.3f}")
        assert abs(got - want) <= 1e-4 * want
