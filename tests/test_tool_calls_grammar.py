"""call_grammar: the llguidance grammar that forces tool calls. Each grammar validates, and
sampling under its mask from random logits over tiny-r1's real tokenizer (a few seeds) writes
text that ToolCallSplitter parses into calls only, each to an offered tool, its arguments valid
against that tool's schema. In process, no ranks."""

from __future__ import annotations

import json

import jsonschema
import llguidance
import llguidance.hf
import llguidance.numpy as lln
import numpy as np
import pytest

from mlxdist.serving.grammar import GrammarError
from mlxdist.serving.tool_calls import ToolCallSplitter, call_grammar

# Bounded strings and numbers: random logits would otherwise rarely pick the closing quote.
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
SEARCH = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "maxLength": 6},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "filter": {
            "type": "object",
            "properties": {"exact": {"type": "boolean"}},
            "required": ["exact"],
            "additionalProperties": False,
        },
    },
    "required": ["query", "filter"],
    "additionalProperties": False,
}
NOTHING = {"type": "object", "properties": {}, "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "search", "parameters": SEARCH}},
    {"type": "function", "function": {"name": "now", "parameters": NOTHING}},
]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH, "now": NOTHING}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from mlxdist.testing.tiny_r1 import _write_tokenizer, build_config

    out = tmp_path_factory.mktemp("tiny_r1_tokenizer")
    _write_tokenizer(out, build_config())
    tok = AutoTokenizer.from_pretrained(out)
    return tok, llguidance.hf.from_tokenizer(tok)


def _sample(tokenizer, grammar: str, seed: int, limit: int = 2000) -> str:
    tok, ll = tokenizer
    matcher = llguidance.LLMatcher(ll, grammar)
    assert not matcher.is_error(), matcher.get_error()
    rng = np.random.default_rng(seed)
    mask = lln.allocate_token_bitmask(1, ll.vocab_size)
    ids: list[int] = []
    for _ in range(limit):
        if matcher.is_stopped():
            break
        lln.fill_next_token_bitmask(matcher, mask)
        logits = rng.normal(size=(1, ll.vocab_size)).astype(np.float32)
        lln.apply_token_bitmask_inplace(logits, mask)
        token = int(np.argmax(logits))
        if token == tok.eos_token_id:
            break
        assert matcher.consume_token(token), matcher.get_error()
        ids.append(token)
    assert matcher.is_accepting(), tok.decode(ids)
    return tok.decode(ids)


# The formats with a grammar (gpt-oss's below); tiny-r1's vocabulary has DeepSeek's markers as
# tokens, the others' markers are written out as text. The XML-like formats (Qwen3-Coder, GLM,
# MiniMax, DeepSeek-V3.2's DSML) write strings bare and other values as JSON.
FORMATS = [
    *("deepseek_r1", "deepseek_v31", "json_tools", "kimi_k2"),
    *("qwen3_coder", "glm47", "minimax_m2", "llama3_json", "deepseek_v32"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", [None, "search"])
def test_sampled_calls_parse_and_validate(tokenizer, fmt, name):
    grammar = call_grammar(fmt, TOOLS, name, vocab=tokenizer[0].get_vocab())
    assert llguidance.LLMatcher.validate_grammar(grammar, tokenizer[1]) == ""
    seen = set()
    for seed in range(4):
        text = _sample(tokenizer, grammar, seed)
        splitter = ToolCallSplitter(fmt, TOOLS)
        content, calls = splitter.feed(text)
        rest, more = splitter.finish()
        assert content + rest == "", text  # nothing but calls
        assert calls + more, text
        for call in calls + more:
            assert call.name == name or (name is None and call.name in SCHEMAS)
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
            seen.add(call.name)
    assert seen


def test_deepseek_grammar_names_its_markers_as_tokens(tokenizer):
    grammar = call_grammar("deepseek_r1", TOOLS[:1])
    assert "<｜tool▁calls▁begin｜> call" in grammar and '"function"' in grammar
    # a tool without parameters takes any JSON object
    bare = call_grammar("deepseek_v31", [{"type": "function", "function": {"name": "now"}}])
    assert '%json{"type": "object"' in bare
    assert llguidance.LLMatcher.validate_grammar(bare, tokenizer[1]) == ""


@pytest.mark.parametrize(
    "fmt,tools,name,words",
    [
        ("pythonic", TOOLS, None, "not supported"),
        ("deepseek_r1", TOOLS, "missing", "'missing'"),
        ("deepseek_r1", [], None, "no tools"),
        ("deepseek_r1", [{"type": "function", "function": {}}], None, "name"),
    ],
)
def test_refusals_say_why(fmt, tools, name, words):
    with pytest.raises(GrammarError, match=words):
        call_grammar(fmt, tools, name)


def test_after_the_reasoning_the_calls_are_forced(tokenizer):
    """R1's prompt leaves it inside <think>: the reasoning runs free to </think>, then calls."""
    from mlxdist.serving.reasoning import ReasoningSplitter

    tok, ll = tokenizer
    grammar = call_grammar("deepseek_r1", TOOLS, vocab=tok.get_vocab(), think=True)
    end_think = tok.convert_tokens_to_ids("</think>")
    for seed in range(3):
        matcher = llguidance.LLMatcher(ll, grammar)
        rng = np.random.default_rng(seed)
        mask = lln.allocate_token_bitmask(1, ll.vocab_size)
        ids: list[int] = []
        while not matcher.is_stopped() and len(ids) < 600:
            lln.fill_next_token_bitmask(matcher, mask)
            logits = rng.normal(size=(1, ll.vocab_size)).astype(np.float32)
            logits[0, end_think] += 2.5  # end the random reasoning within a few dozen tokens
            lln.apply_token_bitmask_inplace(logits, mask)
            ids.append(int(np.argmax(logits)))
            assert matcher.consume_token(ids[-1]), matcher.get_error()
        assert matcher.is_accepting()
        reasoning, content = ReasoningSplitter(in_think=True).feed(tok.decode(ids))
        splitter = ToolCallSplitter("deepseek_r1", TOOLS)
        text, calls = splitter.feed(content)
        assert text == "" and calls and splitter.finish() == ("", [])
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_think_written_out_ends_at_the_first_close_tag(tokenizer):
    """A vocabulary without </think> as a token: the tag is text, and the reasoning ends there."""
    tok, ll = tokenizer
    grammar = call_grammar("json_tools", TOOLS[2:], vocab={}, think=True)
    matcher = llguidance.LLMatcher(ll, grammar)
    pieces = ["why? </", "think>\n\n<tool_call>\n", '{"name":"now","arguments":{}}\n</tool_call>']
    ids = [t for p in pieces for t in tok.encode(p, add_special_tokens=False)]
    assert matcher.consume_tokens(ids), matcher.get_error()
    assert matcher.is_accepting()


def test_harmony_grammar_samples_one_call_the_splitter_reads(tmp_path):
    """gpt-oss (make-model's tokenizer, harmony's markers as its added tokens): an optional
    analysis message, then one call on the commentary channel ending at <|call|>."""
    from transformers import AutoTokenizer

    from mlxdist.serving.harmony import HarmonySplitter
    from mlxdist.testing.families import FAMILIES
    from mlxdist.testing.make_model import _write_tokenizer, family_config

    _write_tokenizer(tmp_path, FAMILIES["gpt_oss"], family_config("gpt_oss"))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ll = llguidance.hf.from_tokenizer(tok)
    grammar = call_grammar("harmony", TOOLS, vocab=tok.get_vocab())
    end = tok.convert_tokens_to_ids("<|end|>")
    for seed in range(3):
        matcher = llguidance.LLMatcher(ll, grammar)
        rng = np.random.default_rng(seed)
        mask = lln.allocate_token_bitmask(1, ll.vocab_size)
        ids: list[int] = []
        while not matcher.is_stopped() and len(ids) < 600:
            lln.fill_next_token_bitmask(matcher, mask)
            logits = rng.normal(size=(1, ll.vocab_size)).astype(np.float32)
            logits[0, end] += 2.5  # end a random analysis message soon
            lln.apply_token_bitmask_inplace(logits, mask)
            ids.append(int(np.argmax(logits)))
            assert matcher.consume_token(ids[-1]), matcher.get_error()
        assert matcher.is_accepting()
        text = tok.decode(ids[:-1])  # <|call|> is an end token: the answer stops before it
        splitter = HarmonySplitter()
        _, content = splitter.feed(text)
        assert content + splitter.finish()[1] == ""
        calls = splitter.take_calls()
        assert len(calls) == 1, text
        jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS[calls[0].name])
