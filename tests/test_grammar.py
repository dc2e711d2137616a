"""Structured output's grammar, in process: every schema of mlxdist/testing/schemas.py sampled
through GrammarMask over random logits with SmolLM2's and tiny-r1's real tokenizers (several
seeds, 200 tokens at most) gives JSON that parses and validates against it (jsonschema)."""

from __future__ import annotations

import json

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from anthropic import transform_schema
from mlx_lm.utils import load_tokenizer
from openai.lib._parsing._completions import type_to_response_format_param
from openai.lib._parsing._responses import type_to_text_format_param

from mlxdist.runtime.grammar import GrammarMask, GrammarViolation, ll_tokenizer
from mlxdist.serving.grammar import json_grammar
from mlxdist.testing.schemas import SCHEMAS, Order

SEEDS = (0, 1, 2)
MAX_TOKENS = 200
# Random logits, tilted toward tokens that hold a closing character so that free strings end
# after a few tokens (uniform draws over 49k tokens almost never pick the closing quote); the
# mask alone decides what may be sampled.
CLOSING_TILT = 1.5


class Vocab:
    """A model's tokenizer, the width of its logits, and the tilt of the random logits."""

    def __init__(self, folder):
        self.tokenizer = load_tokenizer(folder)
        self.width = json.loads((folder / "config.json").read_text())["vocab_size"]
        hf = self.tokenizer._tokenizer
        self.tilt = np.zeros(self.width, np.float32)
        closing = [i for i in range(len(hf)) if any(c in hf.decode([i]) for c in '"]}')]
        self.tilt[closing] = CLOSING_TILT


@pytest.fixture(scope="module", params=["smollm2", "tiny_r1"])
def vocab(request):
    return Vocab(request.getfixturevalue(request.param))


def sample(
    vocab: Vocab, grammar: str, seed: int, max_tokens: int = MAX_TOKENS
) -> tuple[str, GrammarMask]:
    """Masked sampling over random logits until the grammar is complete (or max_tokens)."""
    rng = np.random.default_rng(seed)
    mask = GrammarMask(vocab.tokenizer, grammar, vocab.width)
    tokens = []
    while not mask.done and len(tokens) < max_tokens:
        logits = mx.array(rng.standard_normal(vocab.width, dtype=np.float32) + vocab.tilt)
        token = int(mx.argmax(mask.apply(logits[None]), axis=-1).item())
        mask.accept(token)
        tokens.append(token)
    return vocab.tokenizer.decode(tokens), mask


def validator(schema: dict | None):
    schema = {"type": "object"} if schema is None else schema
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER  # date, uuid, email are checked
    return jsonschema.Draft202012Validator(schema, format_checker=checker)


def compact(text: str) -> bool:
    """No whitespace outside strings (json_grammar's compact form)."""
    inside = escaped = False
    for c in text:
        if inside:
            inside, escaped = (escaped or c != '"'), (not escaped and c == "\\")
        elif c == '"':
            inside = True
        elif c.isspace():
            return False
    return True


def test_the_table_has_30_schemas_or_more():
    assert len(SCHEMAS) >= 30
    assert len({name for name, _ in SCHEMAS}) == len(SCHEMAS)


@pytest.mark.parametrize("name, schema", SCHEMAS, ids=[name for name, _ in SCHEMAS])
def test_every_answer_validates(vocab, name, schema):
    grammar = json_grammar(schema)
    for seed in SEEDS:
        text, mask = sample(vocab, grammar, seed)
        assert mask.done, f"{name}, seed {seed}: unfinished after {MAX_TOKENS} tokens: {text!r}"
        validator(schema).validate(json.loads(text))
        assert compact(text), f"{name}: whitespace between tokens of {text!r}"


@pytest.mark.parametrize("name", ["any_object", "person", "array_of_objects"])
def test_the_draws_differ(vocab, name):
    """The random logits do steer the answer: the sampler is not stuck on one path."""
    grammar = json_grammar(dict(SCHEMAS)[name])
    answers = {sample(vocab, grammar, seed)[0] for seed in SEEDS}
    assert len(answers) == len(SEEDS), answers


def test_the_official_clients_schemas_hold(vocab):
    """openai's clients' schema for a pydantic model (nested models through $defs, Optional, an
    enum, a Literal, bounds), in chat's and the Responses API's shapes: the answers are Orders.
    anthropic's transform_schema moves the bounds into descriptions (its API does not enforce
    them): those answers validate against the schema it sends."""
    from mlxdist.serving.grammar import (
        anthropic_format_grammar,
        chat_format_grammar,
        responses_format_grammar,
    )

    openai = [
        chat_format_grammar(type_to_response_format_param(Order)),
        responses_format_grammar(type_to_text_format_param(Order)),
    ]
    for grammar in openai:
        for seed in SEEDS:
            text, mask = sample(vocab, grammar, seed)
            assert mask.done, text
            Order.model_validate_json(text)
    claude = transform_schema(Order)
    grammar = anthropic_format_grammar({"type": "json_schema", "schema": claude})
    for seed in SEEDS:
        text, mask = sample(vocab, grammar, seed, max_tokens=1000)  # unbounded integers
        assert mask.done, text
        validator(claude).validate(json.loads(text))


def test_ids_past_the_vocabulary_are_never_allowed(vocab):
    """tiny-r1's logits are wider than its tokenizer (1024 against 899 ids): those ids stay at
    -inf at every step, and accepting one is refused."""
    size = len(vocab.tokenizer._tokenizer)
    grammar = json_grammar(dict(SCHEMAS)["person"])
    mask = GrammarMask(vocab.tokenizer, grammar, vocab.width + 64)  # wider still
    rng = np.random.default_rng(0)
    while not mask.done:
        allowed = mask.allowed()
        assert allowed.shape == (vocab.width + 64,) and not allowed[size:].any()
        logits = mx.array(rng.standard_normal(vocab.width + 64, dtype=np.float32) + 50)
        masked = mask.apply(logits)
        assert mx.all(mx.isneginf(masked[size:])).item()
        mask.accept(int(mx.argmax(masked).item()))
    with pytest.raises(GrammarViolation, match=f"token {size} is not in the tokenizer"):
        mask.accept(size)


def test_only_the_end_tokens_follow_a_complete_answer(vocab):
    """Once the grammar is complete the mask allows exactly the end ids it was given (the
    tokenizer's by default); before that, none of them."""
    default_end = vocab.tokenizer.eos_token_ids
    for ends in (None, sorted(default_end | {0})):
        mask = GrammarMask(
            vocab.tokenizer, json_grammar(dict(SCHEMAS)["boolean"]), vocab.width, ends
        )
        expected = set(ends or default_end)
        prefix = vocab.tokenizer.encode('{"ok":true}', add_special_tokens=False)
        for token in prefix:
            assert not mask.done and not mask.allowed()[sorted(expected)].any()
            mask.accept(token)
        assert mask.done
        assert set(np.flatnonzero(mask.allowed())) == expected
        mask.accept(min(expected))  # the end token itself is accepted
        assert mask.done


def test_an_answer_that_may_go_on_allows_its_end_too(vocab):
    """A top-level integer is complete after "42" but may take more digits: not done, and both
    an end token and a digit are allowed."""
    mask = GrammarMask(vocab.tokenizer, json_grammar({"type": "integer"}), vocab.width)
    for token in vocab.tokenizer.encode("42", add_special_tokens=False):
        mask.accept(token)
    allowed = mask.allowed()
    assert not mask.done
    assert allowed[sorted(vocab.tokenizer.eos_token_ids)].all()
    assert allowed[vocab.tokenizer.encode("7", add_special_tokens=False)[0]]


def test_a_forbidden_token_is_refused(vocab):
    mask = GrammarMask(vocab.tokenizer, json_grammar(dict(SCHEMAS)["boolean"]), vocab.width)
    letter = vocab.tokenizer.encode("x", add_special_tokens=False)[0]
    assert not mask.allowed()[letter]
    with pytest.raises(GrammarViolation, match=f"token {letter} .* is not allowed by the grammar"):
        mask.accept(letter)
    with pytest.raises(GrammarViolation, match="the grammar failed"):
        mask.allowed()


@pytest.mark.parametrize("shape", [(1, -1), (-1,)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_apply_keeps_the_logits_shape_and_dtype(vocab, shape, dtype):
    mask = GrammarMask(vocab.tokenizer, json_grammar(None), vocab.width)
    logits = mx.arange(vocab.width).astype(dtype).reshape(shape)
    masked = mask.apply(logits)
    assert masked.shape == logits.shape and masked.dtype == dtype
    allowed = mask.allowed()
    kept = np.array(masked.reshape(-1).astype(mx.float32))
    given = np.array(logits.reshape(-1).astype(mx.float32))
    assert np.isneginf(kept[~allowed]).all() and (kept[allowed] == given[allowed]).all()


def test_the_llguidance_tokenizer_is_built_once(vocab):
    """Once per tokenizer and end ids in a process, from the wrapper or the HF tokenizer."""
    ends = vocab.tokenizer.eos_token_ids
    first = ll_tokenizer(vocab.tokenizer)
    assert ll_tokenizer(vocab.tokenizer) is first
    assert ll_tokenizer(vocab.tokenizer._tokenizer, ends) is first
    assert ll_tokenizer(vocab.tokenizer, sorted(ends | {0})) is not first


def test_reasoning_first_then_the_json(tiny_r1):
    """R1's prompt ends inside a think block: with think_end the reasoning runs free up to
    `</think>` (the end token is refused there), then the answer is the schema's JSON."""
    vocab = Vocab(tiny_r1)
    think_end = vocab.tokenizer._tokenizer.convert_tokens_to_ids("</think>")
    vocab.tilt[think_end] = 6.0  # random reasoning closes within a few dozen tokens
    schema = dict(SCHEMAS)["person"]
    grammar = json_grammar(schema, think_end=think_end)
    ends = sorted(vocab.tokenizer.eos_token_ids)
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        mask = GrammarMask(vocab.tokenizer, grammar, vocab.width)
        tokens = []
        while not mask.done and len(tokens) < MAX_TOKENS:
            if think_end not in tokens:
                assert not mask.allowed()[ends].any()  # no ending inside the reasoning
            logits = mx.array(rng.standard_normal(vocab.width, dtype=np.float32) + vocab.tilt)
            token = int(mx.argmax(mask.apply(logits)).item())
            mask.accept(token)
            tokens.append(token)
        assert mask.done and think_end in tokens
        cut = tokens.index(think_end)
        answer = vocab.tokenizer.decode(tokens[cut + 1 :])
        validator(schema).validate(json.loads(answer))
        assert answer.lstrip("\n").startswith("{")
