"""Continuous batching across pipeline stages: concurrent answers share the ring, unchanged.

Real rank processes and real HTTP: several requests at once (streamed and not, greedy and
seeded, with a stop string and different lengths, one joining while others run) must each get
exactly the answer it gets alone, and the ring must have held one step per stage at once.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from conftest import local_cluster

pytestmark = pytest.mark.cluster

PROMPTS = [
    {"prompt": "The quick brown fox", "max_tokens": 12},
    {"prompt": "Once upon a time", "max_tokens": 7, "stream": True},
    {"prompt": "In the beginning", "max_tokens": 10, "temperature": 1.0, "seed": 7},
    {"prompt": "A B C D E F G", "max_tokens": 9, "stop": ["e"]},
    {"prompt": "Hello", "max_tokens": 1},
    {"prompt": "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16", "max_tokens": 8, "stream": True},
]


def _answer(url: str, body: dict) -> tuple[str, str]:
    """The text and finish reason of one completion, streamed or not."""
    if not body.get("stream"):
        r = httpx.post(url + "/v1/completions", json=body, timeout=300)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        return choice["text"], choice["finish_reason"]
    text, reason = "", None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice.get("text") or ""
            reason = choice.get("finish_reason") or reason
    return text, reason


@pytest.fixture(scope="module", params=[[2, 2], [2, 1, 1]], ids=["2-ranks", "3-ranks"])
def cluster(request, tiny_r1):
    # No prefix cache: its hits make prompts so short that requests no longer overlap enough
    # to fill the ring (tests/test_prefix_cache.py runs concurrent answers with it).
    with local_cluster(tiny_r1, request.param, prompt_cache_bytes=0) as (url, _):
        yield url, len(request.param)


def _stats(url: str) -> dict:
    return httpx.get(url + "/mlxdist/stats", timeout=60).json()


def test_concurrent_answers_equal_their_solo_answers(cluster, tiny_r1):
    url, ranks = cluster
    alone = [_answer(url, body) for body in PROMPTS]
    before = _stats(url)["ranks"]
    together: list = [None] * len(PROMPTS)
    # the last request joins while the others are under way
    gate = threading.Event()

    def ask(i: int) -> None:
        if i == len(PROMPTS) - 1:
            gate.wait(60)
        together[i] = _answer(url, PROMPTS[i])
        gate.set()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for body, solo, mixed in zip(PROMPTS, alone, together):
        print(f"{body['prompt'][:20]!r:24} alone {solo!r}  together {mixed!r}")
    assert together == alone
    assert all(text for text, _ in alone[:4])  # the answers compared are not empty
    stats = _stats(url)
    print(f"{ranks} ranks: at most {stats['in_flight_peak']} steps in the ring at once")
    assert stats["in_flight_peak"] == ranks  # one step per stage: every stage had work
    # Control vectors go per request, not per token: interleaved decode steps follow the round
    # both ends of a link foresee, so they go as hidden states alone. A request's start, and
    # its end while others decode, each send at most one hidden state's worth of control.
    hidden = json.loads((tiny_r1 / "config.json").read_text())["hidden_size"] * 4
    steps = stats["ranks"][0]["steps"] - before[0]["steps"]
    control = stats["ranks"][0]["control_bytes"] - before[0]["control_bytes"]
    print(f"rank 0: {steps} steps, {control} control bytes ({control / hidden:.1f} hidden states)")
    assert control <= 2 * len(PROMPTS) * hidden


def test_every_rank_frees_the_caches_of_finished_answers(cluster):
    """Memory stays bounded: a rank holds KV caches only for answers still open."""
    url, _ = cluster
    before = httpx.get(url + "/mlxdist/stats", timeout=60).json()["ranks"]
    threads = [
        threading.Thread(target=_answer, args=(url, {"prompt": f"x {i}", "max_tokens": 3}))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    after = httpx.get(url + "/mlxdist/stats", timeout=60).json()["ranks"]
    for b, a in zip(before, after):
        assert a["open_caches"] <= 1, a  # slot 0's empty cache may stay
        assert a["steps"] > b["steps"]


def test_a_logits_request_leaves_streaming_answers_unchanged(cluster):
    """A job run alone (the logits of a prompt) between interleaved steps must not touch the
    KV cache of any answer under way."""
    url, _ = cluster
    body = {"prompt": "The quick brown fox", "max_tokens": 60, "ignore_eos": True, "stream": True}
    solo = _answer(url, body)
    mixed: list = []
    started = threading.Event()

    def ask() -> None:
        text, reason = "", None
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                started.set()
                choice = json.loads(line[6:])["choices"][0]
                text += choice.get("text") or ""
                reason = choice.get("finish_reason") or reason
        mixed.append((text, reason))

    thread = threading.Thread(target=ask)
    thread.start()
    assert started.wait(60)
    for _ in range(3):
        r = httpx.post(url + "/mlxdist/logits", json={"prompt": [1, 2, 3, 4, 5]}, timeout=60)
        r.raise_for_status()
    thread.join(300)
    assert mixed == [solo]
    assert solo[1] == "length" and solo[0]
