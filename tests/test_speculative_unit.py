"""Speculative decoding's pure parts: prompt lookup's drafts, and the acceptance rule, whose
output must be distributed exactly as the model's own sampling (a chi-square test on a real
model's distribution, which a deliberately wrong rule fails)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load

from mlxdist.runtime.drafting import PromptLookup
from mlxdist.runtime.speculative import distributions, verify_greedy, verify_sampled


@pytest.mark.parametrize(
    "tokens, k, expected",
    [
        ([1, 2, 3, 4, 9, 1, 2, 3], 3, [4, 9, 1]),  # the tail 1 2 3 occurred: what followed it
        ([1, 2, 3, 4, 9, 1, 2, 3], 1, [4]),
        ([5, 6, 7, 5, 6, 8, 5, 6], 2, [8, 5]),  # the latest earlier occurrence wins
        ([1, 2, 3, 7, 2, 3, 8, 9, 2, 3], 2, [8, 9]),
        ([4, 1, 2, 9, 2], 2, [9, 2]),  # only a 1-gram tail repeats
        ([1, 2, 3, 4], 3, []),  # no tail occurred before
        ([7, 7], 3, [7]),  # what follows may run into the tail itself
        ([1, 2, 1, 2], 0, []),
        ([], 2, []),
    ],
)
def test_prompt_lookup(tokens, k, expected):
    assert PromptLookup(tokens).draft(k) == expected
    grown = PromptLookup(tokens[:2])  # extended a few at a time: the same
    grown.extend(tokens[2:5])
    grown.extend(tokens[5:])
    assert grown.draft(k) == expected


def test_prompt_lookup_prefers_the_longest_tail():
    # the 1-gram tail [3] occurred last at index 5 (then 6); the 2-gram [2, 3] at index 1 (then 4)
    lookup = PromptLookup([1, 2, 3, 4, 0, 3, 6, 2, 3], max_n=2)
    assert lookup.draft(2) == [4, 0]
    assert PromptLookup([1, 2, 3, 4, 0, 3, 6, 2, 3], max_n=1).draft(2) == [6, 2]
    with pytest.raises(ValueError):
        PromptLookup(max_n=2, min_n=3)


@pytest.mark.parametrize(
    "best, drafts, expected",
    [
        ([5, 6, 7, 8], [5, 6, 7], [5, 6, 7, 8]),  # all accepted, and the token after them
        ([5, 6, 7, 8], [5, 9, 7], [5, 6]),  # rejected at the second: the argmax there
        ([5, 6, 7, 8], [4, 6, 7], [5]),  # rejected at the first
        ([5], [], [5]),
    ],
)
def test_greedy_verification(best, drafts, expected):
    logits = mx.zeros((len(best), 16))
    for i, b in enumerate(best):
        logits[i, b] = 3.0
    assert verify_greedy(logits, drafts) == expected


def _chi_square_critical(df: int, z: float = 3.0902) -> float:
    """The chi-square quantile at significance 0.001 (z is the normal's), by Wilson and
    Hilferty's approximation, within about 1% for these degrees of freedom."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _wrong_rule(probs, drafts, draft_probs, key):
    """Accepts as the rule does, but on a rejection draws from the model's distribution instead
    of the residual max(p - q, 0): a plausible mistake that over-samples the drafted tokens."""
    out = []
    for i, d in enumerate(drafts):
        key, draw = mx.random.split(key)
        if (mx.random.uniform(key=draw) * draft_probs[i, d] < probs[i, d]).item():
            out.append(d)
            continue
        key, draw = mx.random.split(key)
        out.append(mx.random.categorical(mx.log(probs[i]), key=draw).item())
        return out, key
    return out, key


@pytest.fixture(scope="module")
def position(tiny_r1_no_mtp):
    """The model's distribution at one position (temperature 0.5, top-p 0.95) and a drafter's:
    the same model one token earlier at temperature 0.25, sharper and centred elsewhere, as a
    small drafter's often is."""
    model, _ = load(str(tiny_r1_no_mtp))
    model.set_dtype(mx.float32)  # CPU expert matmul: float32 only
    prompt = mx.array([[5, 17, 200, 33, 61, 90, 12]])
    logits = model(prompt)[0].astype(mx.float32)
    p = distributions(logits[-1:], 0.5, 0.95)
    q = distributions(logits[-2:-1], 0.25, 1.0)
    return p, q


def _histogram(rule, p, q, n: int, vocab: int) -> np.ndarray:
    counts = np.zeros(vocab)
    key = mx.random.key(1234)
    drafter = mx.random.key(99)
    for _ in range(n):
        drafter, draw = mx.random.split(drafter)
        d = mx.random.categorical(mx.log(q[0]), key=draw).item()
        probs = mx.concatenate([p, p])  # the position's distribution, then the next one's
        out, key = rule(probs, [d], q, key)
        counts[out[0]] += 1
    return counts


def _chi_square(counts: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    n = counts.sum()
    expected = n * p
    big = expected >= 5  # bins too small for the test are pooled into one
    observed = np.append(counts[big], counts[~big].sum())
    expect = np.append(expected[big], expected[~big].sum())
    keep = expect > 0
    stat = float((((observed - expect) ** 2)[keep] / expect[keep]).sum())
    return stat, int(keep.sum()) - 1


def test_speculative_sampling_keeps_the_distribution_and_a_wrong_rule_is_caught(position):
    p, q = position
    vocab = p.shape[-1]
    target = np.array(p[0])
    n = 4000
    for rule, should_pass in ((verify_sampled, True), (_wrong_rule, False)):
        counts = _histogram(rule, p, q, n, vocab)
        stat, df = _chi_square(counts, target)
        critical = _chi_square_critical(df)
        print(
            f"{rule.__name__}: chi-square {stat:.1f}, {df} degrees of freedom, "
            f"0.001 at {critical:.1f}"
        )
        assert df >= 5, "the position's distribution should spread over several tokens"
        assert (stat < critical) == should_pass
    # a drafter without a distribution (prompt lookup): each draft had probability 1
    counts = np.zeros(vocab)
    key = mx.random.key(7)
    fixed = int(np.argsort(target)[-2])  # the second likeliest token, drafted every time
    for _ in range(n):
        out, key = verify_sampled(mx.concatenate([p, p]), [fixed], None, key)
        counts[out[0]] += 1
    stat, df = _chi_square(counts, target)
    assert stat < _chi_square_critical(df)
