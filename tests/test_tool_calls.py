"""Tool calls found in a model's answer, per format: each case whole, streamed in pieces of every
size up to 7 and cut in two at every point (so each marker is cut somewhere), giving the same
content and calls; a malformed or unfinished call comes back as content text.

The sequences follow each format as its model's own template or documentation writes it (the
source beside each table); the DeepSeek ones are R1-0528's and V3.1's.
"""

from __future__ import annotations

import json

import pytest

from mlxdist.serving.tool_calls import ToolCallSplitter, tool_format

R1_CALLS, R1_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
R1_CALL, R1_CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


def r1_call(name: str, args: str) -> str:
    # deepseek-ai/DeepSeek-R1-0528, tokenizer_config.json chat_template: an assistant's call is
    # '<｜tool▁call▁begin｜>' + type + '<｜tool▁sep｜>' + name + '\n```json\n' + arguments
    # + '\n```<｜tool▁call▁end｜>', calls joined by '\n', inside calls_begin ... calls_end.
    return f"{R1_CALL}function{SEP}{name}\n```json\n{args}\n```{R1_CALL_END}"


def v31_call(name: str, args: str) -> str:
    # deepseek-ai/DeepSeek-V3.1 README, "ToolCall": <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>
    # tool_call_name<｜tool▁sep｜>tool_call_arguments<｜tool▁call▁end｜>{{additional_tool_calls}}
    # <｜tool▁calls▁end｜>
    return f"{R1_CALL}{name}{SEP}{args}{R1_CALL_END}"


PARIS = ("get_weather", {"city": "Paris"})
ROME = ("get_weather", {"city": "Rome", "days": 3})
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]

# (id, format, output, content, calls)
CASES = [
    # DeepSeek R1-0528
    (
        "r1 one call",
        "deepseek_r1",
        R1_CALLS + r1_call("get_weather", '{"city": "Paris"}') + R1_CALLS_END,
        "",
        [PARIS],
    ),
    (
        "r1 two calls, text before",
        "deepseek_r1",
        "Let me check both.\n\n"
        + R1_CALLS
        + r1_call("get_weather", '{"city": "Paris"}')
        + "\n"
        + r1_call("get_weather", '{"city": "Rome", "days": 3}')
        + R1_CALLS_END,
        "Let me check both.\n\n",
        [PARIS, ROME],
    ),
    (
        "r1 no calls",
        "deepseek_r1",
        "a < b and <｜ is not a marker; x<｜tool",
        "a < b and <｜ is not a marker; x<｜tool",
        [],
    ),
    (
        "r1 malformed arguments are content",
        "deepseek_r1",
        R1_CALLS + r1_call("get_weather", '{"city": Paris}') + R1_CALLS_END,
        R1_CALLS + r1_call("get_weather", '{"city": Paris}') + R1_CALLS_END,  # markers and all
        [],
    ),
    (
        "r1 one good call, one malformed",
        "deepseek_r1",
        R1_CALLS
        + r1_call("get_weather", '{"city": "Paris"}')
        + "\n"
        + r1_call("x", "[1]")
        + R1_CALLS_END,
        "\n" + r1_call("x", "[1]"),
        [PARIS],
    ),
    (
        "r1 unfinished call is content",
        "deepseek_r1",
        R1_CALLS
        + r1_call("get_weather", '{"city": "Paris"}')
        + "\n"
        + R1_CALL
        + "function"
        + SEP
        + "get_wea",
        "\n" + R1_CALL + "function" + SEP + "get_wea",
        [PARIS],
    ),
    (
        "r1 a call's type other than function",
        "deepseek_r1",
        R1_CALLS + r1_call("get_weather", "{}").replace("function", "retrieval") + R1_CALLS_END,
        R1_CALLS + r1_call("get_weather", "{}").replace("function", "retrieval") + R1_CALLS_END,
        [],
    ),
    (
        "r1 text after the calls",
        "deepseek_r1",
        R1_CALLS + r1_call("get_weather", '{"city": "Paris"}') + R1_CALLS_END + " done",
        " done",
        [PARIS],
    ),
    (
        "r1 section left open with nothing in it",
        "deepseek_r1",
        "hi " + R1_CALLS,
        "hi " + R1_CALLS,
        [],
    ),
    # DeepSeek V3.1
    (
        "v31 two calls",
        "deepseek_v31",
        R1_CALLS
        + v31_call("get_weather", '{"city": "Paris"}')
        + v31_call("get_weather", '{"city": "Rome", "days": 3}')
        + R1_CALLS_END,
        "",
        [PARIS, ROME],
    ),
    (
        "v31 arguments not an object",
        "deepseek_v31",
        "ok" + R1_CALLS + v31_call("get_weather", '"Paris"') + R1_CALLS_END,
        "ok" + R1_CALLS + v31_call("get_weather", '"Paris"') + R1_CALLS_END,
        [],
    ),
    # DeepSeek V3.2 (DSML): ggml-org/llama.cpp models/templates/DeepSeek-V3.2.jinja, render_tools
    # and encode_arguments_to_dsml (a string bare with string="true", any other value as JSON).
    (
        "v32 two invokes after text",
        "deepseek_v32",
        'Checking.\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        '</｜DSML｜invoke>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Rome</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜function_calls>",
        "Checking.\n\n",
        [PARIS, ROME],
    ),
    (
        "v32 a value that is no JSON",
        "deepseek_v32",
        '<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="n" '
        'string="false">three</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>',
        '<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="n" '
        'string="false">three</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>',
        [],
    ),
    # Qwen3 (and Hermes): Qwen/Qwen3-8B tokenizer_config.json chat_template, "For each function
    # call, return a json object with function name and arguments within <tool_call></tool_call>
    # XML tags: <tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}
    # \n</tool_call>"
    (
        "qwen3 two calls after text",
        "json_tools",
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", '
        '"days": 3}}\n</tool_call>',
        "Sure.\n",
        [PARIS, ROME],
    ),
    (
        "qwen3 malformed",
        "json_tools",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\n</tool_call>',
        [],
    ),
    (
        "qwen3 unfinished",
        "json_tools",
        'x <tool_call>\n{"name": "get',
        'x <tool_call>\n{"name": "get',
        [],
    ),
    # Qwen3-Coder: Qwen/Qwen3-Coder-30B-A3B-Instruct chat_template.jinja, "<tool_call>\n
    # <function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n</function>\n</tool_call>"
    (
        "qwen3_coder typed by the tool's schema",
        "qwen3_coder",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
        "",
        [ROME],
    ),
    # GLM-4.5 / 4.7: zai-org/GLM-4.5 chat_template.jinja, "<tool_call>NAME\n<arg_key>K</arg_key>\n
    # <arg_value>V</arg_value>\n...</tool_call>"
    (
        "glm one call",
        "glm47",
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
        "",
        [ROME],
    ),
    # Kimi K2: moonshotai/Kimi-K2-Instruct docs/tool_call_guidance.md, "<|tool_calls_section_begin|>
    # <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{...}<|tool_call_end|>
    # <|tool_calls_section_end|>"
    (
        "kimi two calls",
        "kimi_k2",
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_call_begin|>'
        'functions.get_weather:1<|tool_call_argument_begin|>{"city": "Rome", "days": 3}'
        "<|tool_call_end|><|tool_calls_section_end|>",
        "",
        [PARIS, ROME],
    ),
    # MiniMax-M2: MiniMaxAI/MiniMax-M2 docs/tool_calling_guide.md, "<minimax:tool_call>\n
    # <invoke name=\"NAME\">\n<parameter name=\"K\">V</parameter>\n</invoke>\n</minimax:tool_call>"
    (
        "minimax one call",
        "minimax_m2",
        'Checking.<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Rome'
        '</parameter>\n<parameter name="days">3</parameter>\n</invoke>\n</minimax:tool_call>',
        "Checking.",
        [ROME],
    ),
    # Mistral (Magistral/Devstral 2507+): mistralai's tokenizer docs, "[TOOL_CALLS]NAME[ARGS]{...}",
    # running to the end of the output.
    ("mistral one call", "mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "", [PARIS]),
    # Llama 3.1-3.3: meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json chat_template, 'Respond
    # in the format {"name": function name, "parameters": dictionary of argument name and its
    # value}.'; the built-in tools' calls begin with <|python_tag|>.
    (
        "llama one call",
        "llama3_json",
        ' {"name": "get_weather", "parameters": {"city": "Paris"}}',
        "",
        [PARIS],
    ),
    (
        "llama two calls",
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_weather", "parameters": {"city": "Rome", "days": 3}}',
        "",
        [PARIS, ROME],
    ),
    (
        "llama python tag",
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "",
        [PARIS],
    ),
    ("llama plain answer", "llama3_json", "It is sunny {maybe}.", "It is sunny {maybe}.", []),
    ("llama JSON that is no call", "llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    (
        "llama unfinished",
        "llama3_json",
        '{"name": "get_weather", "param',
        '{"name": "get_weather", "param',
        [],
    ),
]


def _run(fmt: str, pieces: list[str]) -> tuple[str, list]:
    splitter = ToolCallSplitter(fmt, TOOLS)
    content, calls = [], []
    for piece in pieces:
        text, new = splitter.feed(piece)
        content.append(text)
        calls += new
    text, new = splitter.finish()
    return "".join(content) + text, [(c.name, json.loads(c.arguments)) for c in calls + new]


@pytest.mark.parametrize(
    "fmt,output,content,calls", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_whole_and_streamed_at_every_split(fmt, output, content, calls):
    expected = (content, [(n, a) for n, a in calls])
    assert _run(fmt, [output]) == expected
    for size in range(1, 8):
        assert _run(fmt, [output[i : i + size] for i in range(0, len(output), size)]) == expected
    for i in range(1, len(output)):
        assert _run(fmt, [output[:i], output[i:]]) == expected, i


def test_calls_arrive_with_the_piece_that_completes_them():
    splitter = ToolCallSplitter("deepseek_r1")
    first = r1_call("get_weather", '{"city": "Paris"}')
    assert splitter.feed("Sure." + R1_CALLS + first[:-3]) == ("Sure.", [])
    text, calls = splitter.feed(first[-3:] + "\n" + R1_CALL)
    assert text == "" and [c.name for c in calls] == ["get_weather"]
    assert calls[0].id.startswith("call_") and json.loads(calls[0].arguments) == {"city": "Paris"}
    assert splitter.finish() == ("\n" + R1_CALL, [])


def test_kimi_keeps_its_call_ids():
    splitter = ToolCallSplitter("kimi_k2")
    out = (
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>'
    )
    _, calls = splitter.feed(out)
    assert [c.id for c in calls] == ["functions.get_weather:0"]


def test_no_format_passes_text_through():
    splitter = ToolCallSplitter(None)
    assert splitter.feed("<tool_call>x") == ("<tool_call>x", [])
    assert splitter.finish() == ("", [])


# Excerpts of real chat templates, enough to show each one's markers (sources beside them).
TEMPLATES = [
    # deepseek-ai/DeepSeek-V3.1 tokenizer_config.json chat_template
    (
        "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>'+ tool['function']['name']"
        " + '<｜tool▁sep｜>' + tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}",
        "deepseek_v31",
    ),
    # deepseek-ai/DeepSeek-R1-0528 tokenizer_config.json chat_template
    (
        "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'"
        " + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments']"
        " + '\\n' + '```' + '<｜tool▁call▁end｜>'}}",
        "deepseek_r1",
    ),
    # ggml-org/llama.cpp models/templates/DeepSeek-V3.2.jinja
    ('{%- set dsml_token = "｜DSML｜" -%}<{{ dsml_token }}function_calls>', "deepseek_v32"),
    # Qwen/Qwen3-8B tokenizer_config.json chat_template
    ('{{- \'<tool_call>\\n{"name": "\' }}{{- tool_call.name }}', "json_tools"),
    # Qwen/Qwen3-Coder-30B-A3B-Instruct chat_template.jinja
    ("{{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}", "qwen3_coder"),
    # zai-org/GLM-4.5 chat_template.jinja
    ("{{ '<arg_key>' + k + '</arg_key>\\n<arg_value>' }}", "glm47"),
    # moonshotai/Kimi-K2-Instruct tokenizer_config.json chat_template
    ("{{ '<|tool_calls_section_begin|>' }}", "kimi_k2"),
    # MiniMaxAI/MiniMax-M2 chat_template.jinja
    ("{{ '<minimax:tool_call>' }}", "minimax_m2"),
    # meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json chat_template
    (
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{{- '\"parameters\": ' }}",
        "llama3_json",
    ),
    # openai/gpt-oss-20b chat_template.jinja
    ("{{ '<|start|>assistant<|channel|>final<|message|>' }}", "harmony"),
    ("{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>' }}", None),
]


@pytest.mark.parametrize("template,fmt", TEMPLATES)
def test_tool_format_from_the_template(template, fmt):
    assert tool_format(template, {}) == fmt


def test_tool_format_of_tiny_r1_and_from_the_vocabulary_alone():
    from mlxdist.testing.tiny_r1 import CHAT_TEMPLATE

    assert tool_format(CHAT_TEMPLATE, {}) == "deepseek_r1"
    assert tool_format(None, {R1_CALL: 7}) == "deepseek_r1"
    assert tool_format(None, {"hello": 1}) is None


# Pieces of every format's markers and bodies, glued at random: whatever the model writes, the
# splitter never raises, and streaming in any pieces gives what the whole text gives.
_FRAGMENTS = [
    R1_CALLS, R1_CALLS_END, R1_CALL, R1_CALL_END, SEP, "function", "get_weather", "\n```json\n",
    '{"city": "Paris"}', "\n```", "\n", " ", "<", "｜", "<tool_call>", "</tool_call>", '{"name": ',
    '"arguments": {}}', "<function=get_weather>", "<parameter=city>", "</parameter>",
    "</function>", "<|tool_calls_section_begin|>", "<|tool_call_begin|>", "functions.f:0",
    "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<|tool_calls_section_end|>",
    "<minimax:tool_call>", '<invoke name="f">', "</invoke>", "</minimax:tool_call>",
    "[TOOL_CALLS]", "[ARGS]", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "x",
    "<|python_tag|>", '{"name": "f", "parameters": {}}', "; ", "{", "<｜DSML｜function_calls>",
    '<｜DSML｜invoke name="f">', '<｜DSML｜parameter name="a" string="false">',
    "</｜DSML｜parameter>", "</｜DSML｜invoke>", "</｜DSML｜function_calls>",
]  # fmt: skip
FORMATS = [
    *("deepseek_r1", "deepseek_v31", "json_tools", "qwen3_coder", "glm47", "kimi_k2"),
    *("minimax_m2", "mistral", "llama3_json", "deepseek_v32"),
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_any_text_streams_as_it_reads_whole(fmt):
    import random

    rng = random.Random(fmt)
    for _ in range(150):
        text = "".join(rng.choice(_FRAGMENTS) for _ in range(rng.randint(1, 14)))
        whole = _run(fmt, [text])
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 4)))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        assert _run(fmt, pieces) == whole, (text, pieces)


def test_a_section_whose_call_fails_comes_back_whole_markers_and_all():
    """An R1 section with a call that does not parse is all content, its closing marker too,
    in any pieces."""
    from mlxdist.serving.tools import deepseek as d

    call = d.CALL_BEGIN + "function" + d.SEP + "get_weather\n```json\n{not json\n```" + d.CALL_END
    bad = "Sure." + d.CALLS_BEGIN + call + d.CALLS_END + " after"
    for size in (1, 3, len(bad)):
        splitter = ToolCallSplitter("deepseek_r1")
        out, calls = "", []
        for i in range(0, len(bad), size):
            content, made = splitter.feed(bad[i : i + size])
            out, calls = out + content, calls + made
        content, made = splitter.finish()
        assert (out + content, calls + made) == (bad, [])
