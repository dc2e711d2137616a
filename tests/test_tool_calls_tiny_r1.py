"""tiny-r1's chat template renders a whole tool round trip in R1-0528's tokens (tools in the
system prompt, the assistant's calls, the tool messages' outputs), its tokenizer holds R1's tool
tokens as single added tokens, and the calls the template writes parse back into the same calls."""

from __future__ import annotations

import json

import pytest

from mlxdist.serving.tool_calls import ToolCallSplitter, tool_format
from mlxdist.testing.tiny_r1 import ASSISTANT, BOS, EOS, TOOL_TOKENS, USER

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CALLS = [
    {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    },
    {
        "id": "call_2",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Rome"}},
    },
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
]

CALLS_TEXT = (
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
    '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜>\n'
    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
    '```json\n{"city": "Rome"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
)
OUTPUTS_TEXT = (
    "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜>\n"
    "<｜tool▁output▁begin｜>rain<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from mlxdist.testing.tiny_r1 import _write_tokenizer, build_config

    out = tmp_path_factory.mktemp("tiny_r1_tokenizer")
    _write_tokenizer(out, build_config())
    return AutoTokenizer.from_pretrained(out)


def test_round_trip_renders_in_r1_0528_tokens(tokenizer):
    text = tokenizer.apply_chat_template(
        CHAT, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    system, _, turns = text.partition(USER)
    assert system.startswith(BOS + "Be brief.\n\n## Tools")
    assert '### get_weather\nThe weather in a city\nParameters: {"type": "object"' in system
    # the answer after the outputs follows them directly, as in R1-0528's template
    assert turns == "Weather in Paris and Rome?" + ASSISTANT + CALLS_TEXT + EOS + OUTPUTS_TEXT


def test_the_next_turn_after_the_answer(tokenizer):
    chat = [*CHAT, {"role": "assistant", "content": "Sunny in Paris, rain in Rome."}]
    chat.append({"role": "user", "content": "Thanks"})
    text = tokenizer.apply_chat_template(
        chat, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    tail = OUTPUTS_TEXT + "Sunny in Paris, rain in Rome." + EOS + USER + "Thanks" + ASSISTANT
    assert text.endswith(tail + "<think>\n")


def test_without_tools_the_template_is_as_before(tokenizer):
    chat = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == BOS + USER + "hi" + ASSISTANT + "<think>\n"


def test_tool_tokens_are_single_added_tokens_kept_by_decoding(tokenizer):
    for token in TOOL_TOKENS:
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and tokenizer.decode(ids, skip_special_tokens=True) == token


def test_the_calls_the_template_writes_parse_back(tokenizer):
    assert tool_format(tokenizer.chat_template, tokenizer.get_vocab()) == "deepseek_r1"
    splitter = ToolCallSplitter("deepseek_r1")
    ids = tokenizer.encode(CALLS_TEXT, add_special_tokens=False)
    pieces = [splitter.feed(tokenizer.decode([t])) for t in ids] + [splitter.finish()]
    assert "".join(c for c, _ in pieces) == ""
    calls = [(c.name, json.loads(c.arguments)) for _, new in pieces for c in new]
    assert calls == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
