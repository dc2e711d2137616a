"""The llguidance grammar (lark text) that forces an answer to be tool calls in the model's own
format: one call or more, each to one of the offered tools (or only to `name`), its arguments
valid against the tool's JSON schema (`%json{...}`).

llguidance treats every added token of a tokenizer as special: such a token matches only where
the grammar names it (`<｜tool▁sep｜>`), never a quoted string. So a format's markers are named
as tokens when the vocabulary has them (or when no vocabulary is given) and quoted otherwise.
"""

from __future__ import annotations

import json

from mlxdist.serving.grammar import JSON_OPTIONS, GrammarError, check_grammar
from mlxdist.serving.tools import deepseek
from mlxdist.serving.tools.formats import DEEPSEEK_R1, DEEPSEEK_V31, DEEPSEEK_V32, HARMONY
from mlxdist.serving.tools.llama import LLAMA3_JSON

ANY_OBJECT: dict = {"type": "object"}


class Marker(str):
    """A format's marker: a token of its own in the model's vocabulary."""


class Lark(str):
    """Lark written as it is: a rule's name, a regex."""


def _functions(tools: list[dict], name: str | None) -> list[tuple[str, dict]]:
    """(name, parameters schema) of each tool a call may name."""
    out = []
    for tool in tools or []:
        f = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise GrammarError("each tool needs a function with a name", "tools")
        params = f.get("parameters") or ANY_OBJECT
        if not isinstance(params, dict):
            raise GrammarError(f"tool {f['name']!r}: parameters must be a JSON schema", "tools")
        out.append((f["name"], params))
    if name is not None:
        out = [(n, p) for n, p in out if n == name]
        if not out:
            raise GrammarError(f"tool_choice names {name!r}, which is not among the tools")
    if not out:
        raise GrammarError("a tool call is required but no tools were given", "tools")
    return out


def _schema(params: dict) -> str:
    """A %json body: the schema with the compact-JSON options structured output uses."""
    own = params.get("x-guidance")
    options = {**JSON_OPTIONS, **(own if isinstance(own, dict) else {})}
    return "%json" + json.dumps({**params, "x-guidance": options}, ensure_ascii=False)


class _Writer:
    def __init__(self, vocab: dict[str, int] | None) -> None:
        self.vocab = vocab
        self.lines: list[str] = []

    def seq(self, *parts: str) -> str:
        """Lark for the parts in order: markers as tokens (or quoted), Lark as it is, other
        text quoted."""
        out = []
        for p in parts:
            if isinstance(p, Marker):
                as_token = self.vocab is None or p in self.vocab
                out.append(p if as_token else json.dumps(str(p), ensure_ascii=False))
            elif isinstance(p, Lark):
                out.append(p)
            elif p:
                out.append(json.dumps(p, ensure_ascii=False))
        return " ".join(out)

    def calls(self, functions: list[tuple[str, dict]], call) -> str:
        """One rule per tool (`call(name, args_rule)` gives its parts); the `call` rule."""
        names = []
        for i, (fname, params) in enumerate(functions):
            self.lines.append(f"call_{i}: " + self.seq(*call(fname, Lark(f"args_{i}"))))
            self.lines.append(f"args_{i}: {_schema(params)}")
            names.append(f"call_{i}")
        return "call: " + " | ".join(names)


def _deepseek(w: _Writer, fmt: str, functions: list[tuple[str, dict]]) -> str:
    begin, sep, end = Marker(deepseek.CALL_BEGIN), Marker(deepseek.SEP), Marker(deepseek.CALL_END)

    def r1(fname: str, args: str) -> tuple[str, ...]:
        return begin, "function", sep, fname + deepseek.FENCE_OPEN, args, deepseek.FENCE_CLOSE, end

    def v31(fname: str, args: str) -> tuple[str, ...]:
        return begin, fname, sep, args, end

    rule = w.calls(functions, r1 if fmt == DEEPSEEK_R1 else v31)
    more = '("\\n" call)*' if fmt == DEEPSEEK_R1 else "call*"  # R1-0528: a newline between
    head = w.seq(Marker(deepseek.CALLS_BEGIN), Lark("call " + more), Marker(deepseek.CALLS_END))
    return f"start: {head}\n{rule}"


def _json_tools(w: _Writer, functions: list[tuple[str, dict]]) -> str:
    """Qwen3's `<tool_call>` JSON ({"name": ..., "arguments": {...}}), Hermes' too."""

    def call(fname: str, args: str) -> tuple[str, ...]:
        head = '\n{"name":' + json.dumps(fname, ensure_ascii=False) + ',"arguments":'
        return Marker("<tool_call>"), head, args, "}\n", Marker("</tool_call>")

    return 'start: call ("\\n" call)*\n' + w.calls(functions, call)


def _llama(w: _Writer, functions: list[tuple[str, dict]]) -> str:
    """Llama 3.1-3.3: the answer is `{"name": ..., "parameters": {...}}`, `; ` between calls."""

    def call(fname: str, args: str) -> tuple[str, ...]:
        return '{"name":' + json.dumps(fname, ensure_ascii=False) + ',"parameters":', args, "}"

    return 'start: call ("; " call)*\n' + w.calls(functions, call)


def _kimi(w: _Writer, functions: list[tuple[str, dict]]) -> str:
    """Kimi K2: `functions.NAME:INDEX<|tool_call_argument_begin|>{...}` in each call."""

    def call(fname: str, args: str) -> tuple[str, ...]:
        head = Marker("<|tool_call_begin|>"), f"functions.{fname}:", Lark("/[0-9]+/")
        return *head, Marker("<|tool_call_argument_begin|>"), args, Marker("<|tool_call_end|>")

    rule = w.calls(functions, call)
    begin, end = Marker("<|tool_calls_section_begin|>"), Marker("<|tool_calls_section_end|>")
    return f"start: {w.seq(begin, Lark('call+'), end)}\n{rule}"


def _free_text(w: _Writer, rule: str, until: Marker) -> None:
    """`rule`: any text, then `until`. As a token `until` is never part of the text; written
    out, a lazy rule ends at its first occurrence."""
    if w.vocab is None or until in w.vocab:
        w.lines += [f"{rule}: {rule.upper()} {until}", f"{rule.upper()}: /(?s:.*)/"]
    else:
        w.lines.append(f"{rule}[lazy]: /(?s:.*){_regex_escape(until)}/")


def _regex_escape(text: str) -> str:
    """text as a lark /regex/ that matches it literally."""
    special = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "/": "\\/"}
    return "".join(special.get(c) or ("\\" + c if c in r"\.^$*+?()[]{}|" else c) for c in text)


def _harmony(w: _Writer, functions: list[tuple[str, dict]]) -> str:
    """gpt-oss: after the prompt's `<|start|>assistant`, an optional analysis message, then one
    call on the commentary channel, `<|channel|>commentary to=functions.NAME <|constrain|>json
    <|message|>{...}<|call|>` (OpenAI's harmony guide, "Function calling"); <|call|> ends the
    output, so there is one call per answer."""
    channel, message = Marker("<|channel|>"), Marker("<|message|>")

    def call(fname: str, args: str) -> tuple[str, ...]:
        head = channel, f"commentary to=functions.{fname} ", Marker("<|constrain|>"), "json"
        return *head, message, args, Marker("<|call|>")

    rule = w.calls(functions, call)
    _free_text(w, "analysis_text", Marker("<|end|>"))
    analysis = w.seq(channel, "analysis", message, Lark("analysis_text"), Marker("<|start|>"))
    return f'start: analysis? call\nanalysis: {analysis} "assistant"\n{rule}'


# The XML-like formats write each argument as text between tags: a string as it is, any other
# value as JSON (how the formats' own templates render them, and how mlx-lm's parsers read them
# back by the tool's schema). Arguments come in the schema's order, the required ones always.
# A string's enum, const and length are kept; its pattern and format are not (no JSON here).
_XML = {
    # Qwen/Qwen3-Coder-30B-A3B-Instruct chat_template.jinja
    "qwen3_coder": (
        ("<tool_call>", "\n<function={name}>\n"),
        ("</function>\n", "</tool_call>"),
        ("<parameter={key}>\n", "\n</parameter>\n"),
        '("\\n" call)*',
    ),
    # zai-org/GLM-4.5 chat_template.jinja
    "glm47": (
        ("<tool_call>", "{name}\n"),
        ("", "</tool_call>"),
        ("<arg_key>{key}</arg_key>\n<arg_value>", "</arg_value>\n"),
        '("\\n" call)*',
    ),
    # MiniMaxAI/MiniMax-M2 chat_template.jinja: all calls in one <minimax:tool_call> block
    "minimax_m2": (
        ("", '<invoke name="{name}">\n'),
        ("</invoke>\n", ""),
        ('<parameter name="{key}">', "</parameter>\n"),
        "call*",
    ),
    # DeepSeek-V3.2 (serving/tools/deepseek.py): all calls in one DSML block, its markers text
    DEEPSEEK_V32: (
        ("", deepseek.DSML_INVOKE + '"{name}">\n'),
        (deepseek.DSML_INVOKE_END + "\n", ""),
        (deepseek.DSML_PARAM, deepseek.DSML_PARAM_END + "\n"),
        "call*",
    ),
}
# The formats whose calls sit in one block: its opening and closing markers (tokens or text).
_BLOCKS = {
    "minimax_m2": (Marker("<minimax:tool_call>"), Marker("</minimax:tool_call>")),
    DEEPSEEK_V32: (deepseek.DSML_CALLS_BEGIN, deepseek.DSML_CALLS_END),
}


def _is_string(schema: dict) -> bool:
    kinds = schema.get("type")
    enum = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if isinstance(enum, list) and enum:
        return all(isinstance(v, str) for v in enum)
    return kinds == "string"


def _string_value(w: _Writer, rule: str, schema: dict, close: str) -> str:
    """A string argument and its closing tag: one of its enum, or text up to the tag."""
    enum = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if isinstance(enum, list) and enum:
        close_lit = json.dumps(close, ensure_ascii=False)
        options = " | ".join(json.dumps(v, ensure_ascii=False) + " " + close_lit for v in enum)
        w.lines.append(f"{rule}: {options}")
        return rule
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    span = f"{{{int(low)},{int(high)}}}" if isinstance(high, int) else f"{{{int(low)},}}"
    w.lines.append(f"{rule}[lazy]: /(?s:.{span}){_regex_escape(close)}/")
    return rule


def _xml(w: _Writer, fmt: str, functions: list[tuple[str, dict]]) -> str:
    (marker, head), (tail, end_marker), (open_, close), more = _XML[fmt]
    names = []
    for i, (fname, params) in enumerate(functions):
        props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
        required = set(params.get("required") or [])
        parts = []
        for k, (key, schema) in enumerate(props.items()):
            schema = schema if isinstance(schema, dict) else {}
            rule = f"arg_{i}_{k}"
            is_string = _is_string(schema)
            opening = w.seq(open_.format(key=key, string="true" if is_string else "false"))
            if is_string:
                value = _string_value(w, f"value_{i}_{k}", schema, close)
                w.lines.append(f"{rule}: {opening} {value}")
            else:
                schema_text = _schema(schema)
                w.lines.append(f"{rule}: {opening} {schema_text} {w.seq(close)}")
            parts.append(rule if key in required else f"{rule}?")
        first = (Marker(marker),) if marker else ()
        last = (Marker(end_marker),) if end_marker else ()
        body = (Lark(" ".join(parts)),) if parts else ()
        w.lines.append(f"call_{i}: " + w.seq(*first, head.format(name=fname), *body, tail, *last))
        names.append(f"call_{i}")
    rule = "call: " + " | ".join(names)
    if fmt in _BLOCKS:
        begin, end = _BLOCKS[fmt]
        section = w.seq(begin, "\n", Lark("call " + more), end)
        return f"start: {section}\n{rule}"
    return f"start: call {more}\n{rule}"


def call_grammar(
    fmt: str | None,
    tools: list[dict],
    name: str | None = None,
    vocab: dict[str, int] | None = None,
    think: bool = False,
) -> str:
    """Lark text forcing one or more calls of `tools` (only `name`, if given) in format `fmt`;
    `vocab`, the tokenizer's, says which markers are tokens of their own. With `think` (the
    prompt leaves the model inside a <think> block, as R1's does) the reasoning runs free up to
    </think> and the calls follow. GrammarError for a format with no grammar here, or tools it
    cannot hold."""
    functions = _functions(tools, name)
    w = _Writer(vocab)
    if fmt in (DEEPSEEK_R1, DEEPSEEK_V31):
        head = _deepseek(w, fmt, functions)
    elif fmt == "json_tools":
        head = _json_tools(w, functions)
    elif fmt == "kimi_k2":
        head = _kimi(w, functions)
    elif fmt == LLAMA3_JSON:
        head = _llama(w, functions)
    elif fmt == HARMONY:
        head = _harmony(w, functions)
    elif fmt in _XML:
        head = _xml(w, fmt, functions)
    else:
        raise GrammarError(f"a forced tool call is not supported for this model's format ({fmt})")
    if think and fmt != HARMONY:  # harmony's reasoning is its analysis message, always allowed
        calls = head.replace("start:", "calls:", 1)
        _free_text(w, "reasoning", Marker("</think>"))
        head = f"start: reasoning /[ \\n]*/ calls\n{calls}"  # R1: a blank line after </think>
    grammar = "\n".join([head, *w.lines]) + "\n"
    check_grammar(grammar, "tools")
    return grammar
