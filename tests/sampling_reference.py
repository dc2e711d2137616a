"""One mlx-lm process's answer with sampling extras, to compare a cluster's with: its greedy tokens
under mlx-lm's own logits processors and its raw log probabilities per step; and a cluster's
answer to the same request through /v1/completions."""

from __future__ import annotations

import httpx
import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors

# A request's extras in the API's names -> make_logits_processors's
_MLX_LM_NAMES = {
    "logit_bias": "logit_bias",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


def mlx_lm_answer(model, prompt: list[int], max_tokens: int, extras: dict) -> tuple[list, list]:
    """Greedy tokens under mlx-lm's processors for extras (no end-of-sequence stop, as
    ignore_eos) and each step's raw log probabilities (the log-softmax of the model's logits,
    before the processors)."""
    theirs = {_MLX_LM_NAMES[k]: v for k, v in extras.items() if k in _MLX_LM_NAMES}
    if "logit_bias" in theirs:
        theirs["logit_bias"] = {int(k): float(v) for k, v in theirs["logit_bias"].items()}
    rows = []

    def record(_, logits):  # first of the processors: sees the model's own logits
        raw = logits.astype(mx.float32)
        rows.append(np.array(raw - mx.logsumexp(raw, axis=-1, keepdims=True)).reshape(-1))
        return logits

    processors = [record, *make_logits_processors(**theirs)]
    steps = generate_step(
        mx.array(prompt), model, max_tokens=max_tokens, logits_processors=processors
    )
    tokens = [int(token) for token, _ in steps]
    return tokens, rows[: len(tokens)]


def cluster_answer(url: str, prompt: list[int], max_tokens: int, extras: dict) -> dict:
    """The cluster's greedy choice for the prompt with extras (logprobs: an int, as OpenAI's
    completions take it), with its token ids."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    body |= {"return_token_ids": True, **extras}
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def assert_logprobs_match(choice: dict, rows: list[np.ndarray], top: int, tol: float = 1e-4):
    """A completions choice's token_logprobs and top_logprobs equal the reference's rows (the
    log-softmax of one mlx-lm process's logits at each step) within tol."""
    logprobs = choice["logprobs"]
    ids = choice["token_ids"]
    assert len(logprobs["token_logprobs"]) == len(ids) == len(rows)
    worst = 0.0
    for t, got, best, row in zip(ids, logprobs["token_logprobs"], logprobs["top_logprobs"], rows):
        worst = max(worst, abs(got - float(row[t])))
        expected = np.sort(row)[::-1][:top]
        if top == 0:
            assert not best
            continue
        # keyed by token text: ids that decode alike (byte pieces) share one key
        assert 1 <= len(best) <= top
        for value in best.values():
            worst = max(worst, float(np.min(np.abs(expected - value))))
        worst = max(worst, abs(max(best.values()) - float(expected[0])))
    print(f"largest log-probability difference from mlx-lm: {worst:.2e}")
    assert worst <= tol
