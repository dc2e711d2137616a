"""Speculative decoding's rule, on the rank that samples: which drafted tokens the model's own
distribution accepts, and the one token that follows them, so that the answer is distributed
exactly as without drafts (the rule of Leviathan et al. and Chen et al., 2023).

One pass of the model over the last sampled token and k drafted tokens gives k+1 distributions.
Draft i is accepted with probability min(1, p_i(d) / q_i(d)), where p_i is the model's
distribution at its position and q_i the drafter's (1 for a drafter that proposes one token
without a distribution, such as prompt lookup). At the first rejection the token is drawn from
max(p_i - q_i, 0), normalised, and the pass ends; when every draft is accepted the model's last
distribution gives one more token. At temperature 0 this is: drafts are accepted while they are
the argmax, and the argmax follows.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p

from mlxdist.runtime.step import DRAFT, VERIFY


def distributions(logits: mx.array, temp: float, top_p: float) -> mx.array:
    """The probabilities a Sampler draws from, one row per position: nucleus-cut log
    probabilities over the temperature, as mlxdist.runtime.sampling.Sampler does."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if 0 < top_p < 1.0:
        logprobs = apply_top_p(logprobs, top_p)
    return mx.softmax(logprobs * (1.0 / temp), axis=-1)


def verify_greedy(logits: mx.array, drafts: list[int]) -> list[int]:
    """Temperature 0: the drafts the argmax agrees with, then the argmax after them."""
    best = mx.argmax(logits, axis=-1).tolist()
    n = 0
    while n < len(drafts) and drafts[n] == best[n]:
        n += 1
    return drafts[:n] + [best[n]]


def verify_sampled(
    probs: mx.array, drafts: list[int], draft_probs: mx.array | None, key: mx.array
) -> tuple[list[int], mx.array]:
    """probs: (k+1, vocab) the model's distributions; draft_probs: (k, vocab) the drafter's, or
    None for a drafter without one (each draft had probability 1). Returns the accepted drafts
    and the token after them, and the key to draw with next."""
    out = []
    for i, d in enumerate(drafts):
        key, draw = mx.random.split(key)
        q = 1.0 if draft_probs is None else draft_probs[i, d]
        if (mx.random.uniform(key=draw) * q < probs[i, d]).item():
            out.append(d)
            continue
        q_row = mx.zeros_like(probs[i]).at[d].add(1.0) if draft_probs is None else draft_probs[i]
        residual = mx.maximum(probs[i] - q_row, 0.0)
        key, draw = mx.random.split(key)
        out.append(_draw(residual, draw))
        return out, key
    key, draw = mx.random.split(key)
    out.append(_draw(probs[len(drafts)], draw))
    return out, key


def verify(logits: mx.array, drafts: list[int], sampler) -> mx.array:
    """The last rank's reply to a VERIFY step: logits (k+1, vocab) at the last sampled token and
    k drafts, checked with the sequence's sampler (its temperature, top-p and random key).
    Returns [n, the n tokens, zeros] of length k+2: a fixed size rank 0 knows to receive."""
    if sampler.temp == 0:
        tokens = verify_greedy(logits, drafts)
    else:
        key = sampler.key if sampler.key is not None else mx.random.key(_fresh_seed())
        probs = distributions(logits.astype(mx.float32), sampler.temp, sampler.top_p)
        tokens, key = verify_sampled(probs, drafts, None, key)
        if sampler.key is not None:
            sampler.key = key
    return mx.array([len(tokens), *tokens] + [0] * (len(drafts) + 1 - len(tokens)), mx.int32)


def replied(out: mx.array) -> list[int]:
    """The tokens a VERIFY reply carries."""
    values = out.tolist()
    return values[1 : 1 + values[0]]


def reply_words(flags: int, length: int, drafts: int) -> int:
    """The int32 words of a step's token reply: one token, or a VERIFY step's [n, tokens,
    padding] (length + 1), then the MTP layer's drafts when the step has the DRAFT flag."""
    return (length + 1 if flags & VERIFY else 1) + (drafts if flags & DRAFT else 0)


def read_reply(out: mx.array, flags: int, length: int) -> tuple[list[int], list[int]]:
    """A token reply's tokens (the sampled one, or a VERIFY step's accepted drafts and the token
    after them) and the drafts for the next step that follow them (DRAFT steps)."""
    values = out.tolist()
    if flags & VERIFY:
        tokens, rest = values[1 : 1 + values[0]], values[length + 1 :]
    else:
        tokens, rest = values[:1], values[1:]
    return tokens, rest if flags & DRAFT else []


def _fresh_seed() -> int:
    return int(mx.random.randint(0, 2**31 - 1, ()).item())


def _draw(weights: mx.array, key: mx.array) -> int:
    """One index with probability proportional to weights (which need not sum to 1)."""
    return mx.random.categorical(mx.log(weights), key=key).item()
