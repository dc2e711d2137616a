"""Structured output on gpt-oss: the JSON grammar lets an analysis message (its reasoning) come
first, then puts the JSON in the final channel, which the harmony splitter reads as the answer.
Masked sampling from random logits over make-model's gpt-oss tokenizer (harmony's markers as
its added tokens), in process."""

from __future__ import annotations

import json

import jsonschema
import llguidance
import llguidance.hf
import llguidance.numpy as lln
import numpy as np

from mlxdist.serving.grammar import json_grammar
from mlxdist.serving.harmony import HarmonySplitter

SCHEMA = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}


def test_gpt_oss_json_follows_an_optional_analysis_in_the_final_channel(tmp_path):
    from transformers import AutoTokenizer

    from mlxdist.testing.families import FAMILIES
    from mlxdist.testing.make_model import _write_tokenizer, family_config

    _write_tokenizer(tmp_path, FAMILIES["gpt_oss"], family_config("gpt_oss"))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ll = llguidance.hf.from_tokenizer(tok)
    grammar = json_grammar(SCHEMA, harmony=True)
    end = tok.convert_tokens_to_ids("<|end|>")
    analysed = 0
    for seed in range(4):
        matcher = llguidance.LLMatcher(ll, grammar)
        assert not matcher.is_error(), matcher.get_error()
        rng = np.random.default_rng(seed)
        mask = lln.allocate_token_bitmask(1, ll.vocab_size)
        ids: list[int] = []
        while not matcher.is_stopped() and len(ids) < 400:
            lln.fill_next_token_bitmask(matcher, mask)
            logits = rng.normal(size=(1, ll.vocab_size)).astype(np.float32)
            logits[0, end] += 2.5  # end a random analysis message soon
            lln.apply_token_bitmask_inplace(logits, mask)
            ids.append(int(np.argmax(logits)))
            assert matcher.consume_token(ids[-1]), matcher.get_error()
        assert matcher.is_accepting()
        if ids[-1] in tok.all_special_ids:  # the end token: the answer stops before it
            ids = ids[:-1]
        text = tok.decode(ids)
        splitter = HarmonySplitter()
        reasoning, content = splitter.feed(text)
        more_reasoning, more_content = splitter.finish()
        analysed += bool(reasoning + more_reasoning)
        jsonschema.validate(json.loads(content + more_content), SCHEMA)
    assert analysed  # the analysis message is allowed, and random logits took it
