"""DeepSeek's own tool-call format (R1-0528, V3-0324 and V3.1), which mlx-lm has no parser for.

A turn's calls sit in one section, each call in its own pair of tokens, newlines between calls:

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>BODY<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

R1-0528 and V3-0324 write BODY as `function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```` (the call's
type, the name, the arguments in a fenced JSON block), V3.1 as `NAME<｜tool▁sep｜>ARGS`.
Sources: deepseek-ai/DeepSeek-R1-0528's tokenizer_config.json chat_template (how an assistant's
tool_calls are rendered back) and deepseek-ai/DeepSeek-V3.1's README, "ToolCall" section
(huggingface.co/deepseek-ai/DeepSeek-V3.1), which documents
`<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>tool_call_name<｜tool▁sep｜>tool_call_arguments<｜tool▁call▁end｜>{{additional_tool_calls}}<｜tool▁calls▁end｜>`.
"""

from __future__ import annotations

import json
import re

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
FENCE_OPEN, FENCE_CLOSE = "\n```json\n", "\n```"


def _arguments(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("arguments are not a JSON object")
    return value


def parse_r1_call(body: str) -> dict:
    """`function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```` -> {"name", "arguments"}."""
    kind, sep, rest = body.partition(SEP)
    if not sep or kind.strip() != "function":
        raise ValueError("not an R1 tool call")
    name, newline, args = rest.partition("\n")
    args = args.strip()
    # The fence is what the template writes; tolerate a model that leaves it out.
    if args.startswith("```"):
        args = args.partition("\n")[2]
        if not args.rstrip().endswith("```"):
            raise ValueError("the arguments' code block is not closed")
        args = args.rstrip()[:-3]
    if not name.strip() or not newline:
        raise ValueError("no function name")
    return {"name": name.strip(), "arguments": _arguments(args)}


def parse_v31_call(body: str) -> dict:
    """`NAME<｜tool▁sep｜>ARGS` -> {"name", "arguments"}."""
    name, sep, args = body.partition(SEP)
    if not sep or not name.strip() or "\n" in name.strip():
        raise ValueError("not a V3.1 tool call")
    return {"name": name.strip(), "arguments": _arguments(args)}


def r1_call_text(name: str, arguments: str) -> str:
    """One call as R1-0528 writes it (the splitter's tests and the grammar build on it)."""
    return f"{CALL_BEGIN}function{SEP}{name}{FENCE_OPEN}{arguments}{FENCE_CLOSE}{CALL_END}"


def v31_call_text(name: str, arguments: str) -> str:
    return f"{CALL_BEGIN}{name}{SEP}{arguments}{CALL_END}"


# DeepSeek-V3.2 writes its calls in DSML instead, all in one block, a string argument bare and any
# other as JSON:
#   <｜DSML｜function_calls>\n<｜DSML｜invoke name="NAME">\n<｜DSML｜parameter name="K"
#   string="true|false">V</｜DSML｜parameter>\n...</｜DSML｜invoke>\n...</｜DSML｜function_calls>
# Source: the tool section DeepSeek-V3.2's encoding writes into the system prompt, as
# ggml-org/llama.cpp's models/templates/DeepSeek-V3.2.jinja renders it (render_tools and
# encode_arguments_to_dsml), and vllm-project/vllm's deepseekv32 tool parser.
DSML_CALLS_BEGIN = "<｜DSML｜function_calls>"
DSML_CALLS_END = "</｜DSML｜function_calls>"
DSML_INVOKE = "<｜DSML｜invoke name="
DSML_INVOKE_END = "</｜DSML｜invoke>"
DSML_PARAM = '<｜DSML｜parameter name="{key}" string="{string}">'
DSML_PARAM_END = "</｜DSML｜parameter>"
_DSML_NAME = re.compile(r'\s*"([^"]+)"\s*>')
_DSML_PARAM = re.compile(
    r'<｜DSML｜parameter\s+name="([^"]+)"\s+string="(true|false)"\s*>(.*?)</｜DSML｜parameter>',
    re.S,
)


def parse_dsml_invoke(body: str) -> dict:
    """`"NAME">` then its parameters (the text after `<｜DSML｜invoke name=`) -> a call."""
    head = _DSML_NAME.match(body)
    if head is None:
        raise ValueError("not a DSML invoke")
    rest, arguments = body[head.end() :], {}
    for m in _DSML_PARAM.finditer(rest):
        key, is_string, value = m.groups()
        arguments[key] = value if is_string == "true" else json.loads(value)
    if _DSML_PARAM.sub("", rest).strip():
        raise ValueError("text in a DSML invoke that is no parameter")
    return {"name": head.group(1), "arguments": arguments}
