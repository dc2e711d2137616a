"""Structured output's grammar, in process: every schema of mlxdist/testing/schemas.py sampled
through GrammarMask over random logits with SmolLM2's and tiny-r1's real tokenizers (several
seeds, 200 tokens at most) gives JSON that parses and validates against it (jsonschema)."""

from __future__ import annotations

import json

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_tokenizer

from mlxdist.runtime.grammar import GrammarMask
from mlxdist.serving.grammar import json_grammar
from mlxdist.testing.schemas import SCHEMAS

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


def sample(vocab: Vocab, grammar: str, seed: int) -> tuple[str, GrammarMask]:
    """Masked sampling over random logits until the grammar is complete (or MAX_TOKENS)."""
    rng = np.random.default_rng(seed)
    mask = GrammarMask(vocab.tokenizer, grammar, vocab.width)
    tokens = []
    while not mask.done and len(tokens) < MAX_TOKENS:
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
