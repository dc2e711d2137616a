"""The lean pipeline: per decoded token, each stage boundary carries one hidden state and nothing
else (the decode round is foreseen, so no control vector goes), and only the sampled token id
travels back to rank 0; no rank all-gathers hidden states or computes logits it does not need."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.cluster

SPLIT = [2, 1, 1]


def stats(url: str) -> dict[int, dict]:
    r = httpx.get(url + "/mlxdist/stats", timeout=60)
    r.raise_for_status()
    return {row["rank"]: row for row in r.json()["ranks"]}


def generate(url: str, prompt: str, n: int) -> int:
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0.0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


def test_bytes_sent_per_decoded_token(tiny_r1, shared_r1_3):
    config = json.loads((tiny_r1 / "config.json").read_text())
    hidden = config["hidden_size"] * 4  # tiny-r1 runs in float32 on the CPU
    prompt = "The quick brown fox"  # tiny-r1 answers it with more than 11 tokens
    url, health, _ = shared_r1_3  # tiny-r1 on [2, 1, 1], shared with test_cluster_equal
    assert health["plan"]["split"] == SPLIT
    generate(url, prompt, 2)  # warm up
    before = stats(url)
    short = generate(url, prompt, 3)
    middle = stats(url)
    long = generate(url, prompt, 11)
    after = stats(url)
    assert long > short, "the model ended early; pick another prompt"
    tokens = long - short
    per_token = {}
    print(f"\n{'rank':>4} {'data B/token':>13} {'control B/token':>16}")
    for r in range(len(SPLIT)):
        d = [
            (after[r][k] - middle[r][k]) - (middle[r][k] - before[r][k])
            for k in ("data_bytes", "control_bytes")
        ]
        per_token[r] = (d[0] / tokens, d[1] / tokens)
        print(f"{r:>4} {per_token[r][0]:>13.1f} {per_token[r][1]:>16.1f}")
    boundaries = len(SPLIT) - 1
    total = sum(v[0] for v in per_token.values())
    print(f"total data per token {total:.0f} B = {boundaries} hidden states of {hidden} B + 4 B")
    for r in range(boundaries):
        assert per_token[r] == (hidden, 0)  # one hidden state, no control vector
    assert per_token[boundaries] == (4, 0)  # the last rank sends back only a token id
    assert total <= boundaries * hidden + 4
