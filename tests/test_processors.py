"""Sampling extras on the sampling rank: bias and penalties equal mlx-lm's own processors, the
extras survive their trip as JSON, and a reply's log probabilities are the raw model's."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import make_logits_processors

from mlxdist.runtime.processors import (
    Processors,
    SamplingExtras,
    read_logprobs,
    sample_reply,
)
from mlxdist.runtime.sampling import Sampler

VOCAB = 50

# (extras, mlx-lm's make_logits_processors arguments)
CASES = [
    (SamplingExtras(logit_bias={3: 5.0, 7: -100.0}), {"logit_bias": {3: 5.0, 7: -100.0}}),
    (SamplingExtras(repetition_penalty=1.3), {"repetition_penalty": 1.3}),
    (SamplingExtras(presence_penalty=0.7), {"presence_penalty": 0.7}),
    (SamplingExtras(frequency_penalty=0.4), {"frequency_penalty": 0.4}),
    (SamplingExtras(frequency_penalty=-1.5), {"frequency_penalty": -1.5}),
    (
        SamplingExtras(
            logit_bias={1: 2.0}, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.2
        ),
        {
            "logit_bias": {1: 2.0},
            "repetition_penalty": 1.1,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.2,
        },
    ),
    (
        SamplingExtras(repetition_penalty=1.2, context_size=5),
        {"repetition_penalty": 1.2, "repetition_context_size": 5},
    ),
]


@pytest.mark.parametrize("extras,theirs", CASES)
def test_processors_equal_mlx_lm(extras, theirs):
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, VOCAB, 30).tolist()
    extras.history = prompt[-extras.context_size :]
    ours = Processors(SamplingExtras.decode(extras.encode()), VOCAB)
    reference = make_logits_processors(**theirs)
    tokens = list(prompt)
    for _ in range(12):  # each step's logits, then the token both sides take
        logits = mx.array(rng.normal(size=(1, VOCAB)) * 3, mx.float32)
        expected = logits
        for p in reference:
            expected = p(mx.array(tokens), expected)
        got = ours.apply(logits)
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-6, atol=1e-6)
        t = int(rng.integers(0, 10))  # repeats, so the counts matter
        ours.accept(t)
        tokens.append(t)


def test_extras_round_trip_and_reply_width():
    e = SamplingExtras(logit_bias={5: -1.5}, top_logprobs=3, grammar='{"grammars": []}')
    back = SamplingExtras.decode(e.encode())
    assert back == e
    assert back.reply_words() == 2 + 2 * 3
    assert SamplingExtras().reply_words() == 1
    assert SamplingExtras(top_logprobs=0).reply_words() == 2


@pytest.mark.parametrize("top", [0, 1, 5])
def test_reply_logprobs_are_the_raw_models(top):
    rng = np.random.default_rng(1)
    logits = mx.array(rng.normal(size=(1, VOCAB)) * 2, mx.float32)
    # A bias that changes the choice, and penalties that write into the logits they are
    # given: the log probabilities stay the model's own.
    extras = SamplingExtras(
        logit_bias={11: 50.0},
        top_logprobs=top,
        presence_penalty=1.5,
        repetition_penalty=1.3,
        history=list(range(0, VOCAB, 2)),
    )
    raw = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True)).reshape(-1)
    out = sample_reply(Sampler(), Processors(extras, VOCAB), logits)
    words = out.tolist()
    assert len(words) == extras.reply_words()
    assert words[0] == 11
    logprob, best = read_logprobs(words)
    assert abs(logprob - raw[11]) < 1e-6
    order = np.argsort(-raw)[:top]
    assert [i for i, _ in best] == order.tolist()
    np.testing.assert_allclose([lp for _, lp in best], raw[order], atol=1e-6)


def test_no_extras_reply_is_the_plain_samplers():
    logits = mx.array(np.random.default_rng(2).normal(size=(1, VOCAB)), mx.float32)
    out = sample_reply(Sampler(), None, logits)
    assert out.tolist() == [int(np.argmax(np.array(logits)))]


def test_grammar_answers_end_and_a_failing_grammar_ends_the_answer(tiny_r1):
    """With a grammar, random logits sampled through the processors give JSON that follows it,
    then only end tokens; a grammar that cannot start ends the answer instead of the rank."""
    import json

    from mlxdist.runtime.tiktoken_tokenizer import load_tokenizer
    from mlxdist.serving.grammar import json_grammar

    tokenizer = load_tokenizer(tiny_r1)
    ends = set(tokenizer.eos_token_ids)
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 9}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    extras = SamplingExtras(grammar=json_grammar(schema), top_logprobs=0)
    vocab = len(tokenizer.vocab) + 7  # logits wider than the vocabulary, as models pad them
    processors = Processors(extras, vocab, lambda: tokenizer)
    sampler = Sampler(temp=1.0, seed=3)
    rng = np.random.default_rng(4)
    tokens = []
    for _ in range(60):
        logits = mx.array(rng.normal(size=(1, vocab)) * 4, mx.float32)
        t = sample_reply(sampler, processors, logits).tolist()[0]
        if t in ends:
            break
        tokens.append(t)
    else:
        raise AssertionError("the grammar never let the answer end")
    answer = json.loads(tokenizer.decode(tokens))
    assert set(answer) == {"ok", "n"} and isinstance(answer["ok"], bool)

    broken = Processors(SamplingExtras(grammar="not a grammar"), vocab, lambda: tokenizer)
    t = sample_reply(Sampler(), broken, mx.zeros((1, vocab))).tolist()[0]
    assert t in ends


def test_a_think_budget_closes_the_block_after_that_many_tokens():
    end = 7
    extras = SamplingExtras(think_budget=3, think_end=end, top_logprobs=None)
    processors = Processors(SamplingExtras.decode(extras.encode()), VOCAB)
    rng = np.random.default_rng(5)
    out = []
    for _ in range(8):
        logits = mx.array(rng.normal(size=(1, VOCAB)), mx.float32)
        logits = logits.at[:, end].add(-50.0)  # the model would never close it
        out.append(sample_reply(Sampler(), processors, logits).tolist()[0])
    assert end not in out[:3] and out[3] == end and end not in out[4:]
