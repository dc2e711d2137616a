"""Structured output on rank 0: the JSON schema a request asks for (OpenAI chat's
`response_format`, the Responses API's `text.format`, Anthropic's `output_config.format`) as one
llguidance grammar, checked before the request is queued. No MLX: the mask itself is computed on
the rank that samples (mlxdist/runtime/grammar.py).

A schema feature llguidance cannot enforce is refused with its name (GrammarError), never
ignored: an answer that only looks constrained is worse than a 400.
"""

from __future__ import annotations

import json

from llguidance import LLMatcher

# Compact JSON: "," and ":" with no whitespace anywhere. With whitespace allowed a tiny model
# (or a random draw) can spend its whole budget on newlines and spaces between two keys; the
# compact form is also the shortest answer for every schema, and parses the same.
JSON_OPTIONS = {"whitespace_flexible": False}

ANY_OBJECT: dict = {"type": "object"}  # json_object mode: any JSON object


class GrammarError(ValueError):
    """A response format or schema that cannot be enforced; the message is one line for a 400,
    `param` the request field it is about."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


def json_grammar(
    schema: dict | None,
    param: str | None = None,
    think_end: int | None = None,
    harmony: bool = False,
) -> str:
    """The llguidance grammar of JSON text valid against `schema` (None: any JSON object).

    With `think_end` (the id of the tokenizer's `</think>` token, for a prompt that leaves the
    model inside a think block, as R1's does): free reasoning first, up to that token and at
    most two newlines after it, then the JSON. With `harmony` (gpt-oss, whose prompt ends at
    the head of a message): an analysis message may come first, then the JSON in the final
    channel."""
    if schema is None:
        schema = ANY_OBJECT
    if not isinstance(schema, dict):
        raise GrammarError("the JSON schema must be an object", param)
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as e:  # a schema json.dumps cannot write, or not an object
        raise GrammarError(f"the JSON schema cannot be read: {_one_line(str(e))}", param) from e
    check_grammar(grammar, param)
    if harmony:
        return _harmony_json(schema, param)
    if think_end is None:
        return grammar
    # The options ride in the schema's own "x-guidance" inside a Lark grammar.
    guidance = schema.get("x-guidance")
    options = {**(guidance if isinstance(guidance, dict) else {}), **JSON_OPTIONS}
    answer = json.dumps({**schema, "x-guidance": options})
    # <[id]>: the token itself (llguidance treats added tokens as special, never as text).
    lark = f"start: /(.|\\n)*/ <[{int(think_end)}]> /\\n{{0,2}}/ answer\nanswer: %json {answer}\n"
    grammar = LLMatcher.grammar_from_lark(lark)
    check_grammar(grammar, param)
    return grammar


def _harmony_json(schema: dict, param: str | None) -> str:
    """gpt-oss: after the prompt's `<|start|>assistant`, an optional analysis message (its
    reasoning, free), then the final channel's message, the JSON; the answer ends after it
    (<|return|>, an end token). Harmony's markers are special tokens, named as such."""
    guidance = schema.get("x-guidance")
    options = {**(guidance if isinstance(guidance, dict) else {}), **JSON_OPTIONS}
    answer = json.dumps({**schema, "x-guidance": options})
    lark = (
        "start: analysis? final\n"
        'analysis: <|channel|> "analysis" <|message|> ANALYSIS <|end|> <|start|> "assistant"\n'
        "ANALYSIS: /(?s:.*)/\n"
        'final: <|channel|> "final" <|message|> answer\n'
        f"answer: %json {answer}\n"
    )
    grammar = LLMatcher.grammar_from_lark(lark)
    check_grammar(grammar, param)
    return grammar


def check_grammar(grammar: str, param: str | None = None, what: str = "the JSON schema") -> None:
    """Raise GrammarError naming what llguidance refuses in `grammar` (an unknown keyword or
    format, an external $ref, a regex with look-around, ...): "{what} cannot be enforced: ..."."""
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        reason = _one_line(messages[0]) if messages else "invalid grammar"
        raise GrammarError(f"{what} cannot be enforced: {reason}", param)


def chat_format_grammar(
    response_format: dict | None, think_end: int | None = None, harmony: bool = False
) -> str | None:
    """OpenAI chat (and completions) `response_format`: `{"type": "text"}` (None back),
    `{"type": "json_object"}`, or `{"type": "json_schema", "json_schema": {"name", "schema",
    "strict"}}`. think_end and harmony, here and below: as json_grammar's."""
    if response_format is None:
        return None
    kind = _kind(response_format, "response_format", ("text", "json_object", "json_schema"))
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar(None, "response_format", think_end, harmony)
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise GrammarError(
            'response_format of type "json_schema" needs a "json_schema" object',
            "response_format.json_schema",
        )
    # OpenAI makes "schema" optional here: without one, any JSON object.
    schema = _schema(spec, "response_format.json_schema", optional=True)
    return json_grammar(schema, "response_format.json_schema.schema", think_end, harmony)


def responses_format_grammar(
    text_format: dict | None, think_end: int | None = None, harmony: bool = False
) -> str | None:
    """The Responses API's `text.format`: `{"type": "text"}` (None back), `{"type":
    "json_object"}`, or `{"type": "json_schema", "name", "schema", "strict"}` (flat)."""
    if text_format is None:
        return None
    kind = _kind(text_format, "text.format", ("text", "json_object", "json_schema"))
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar(None, "text.format", think_end, harmony)
    schema = _schema(text_format, "text.format", optional=False)
    return json_grammar(schema, "text.format.schema", think_end, harmony)


def anthropic_format_grammar(
    output_format: dict | None,
    param: str = "output_config.format",
    think_end: int | None = None,
    harmony: bool = False,
) -> str | None:
    """Anthropic Messages' `output_config.format` (or the beta's top-level `output_format`,
    named by `param`): `{"type": "json_schema", "schema": {...}}`, the one type it has."""
    if output_format is None:
        return None
    _kind(output_format, param, ("json_schema",))
    schema = _schema(output_format, param, optional=False)
    return json_grammar(schema, f"{param}.schema", think_end, harmony)


def _kind(fmt, param: str, kinds: tuple[str, ...]) -> str:
    if not isinstance(fmt, dict):
        raise GrammarError(f"{param} must be an object", param)
    kind = fmt.get("type")
    if kind not in kinds:
        names = ", ".join(f'"{k}"' for k in kinds)
        raise GrammarError(f"{param}.type must be one of {names}, not {json.dumps(kind)}", param)
    return kind


def _schema(holder: dict, param: str, optional: bool) -> dict | None:
    schema = holder.get("schema")
    if schema is None and optional:
        return None
    if not isinstance(schema, dict):
        raise GrammarError(f"{param}.schema must be a JSON schema object", f"{param}.schema")
    return schema


def _one_line(message: str) -> str:
    # llguidance's regex errors come on several lines, with a caret line under the pattern.
    lines = [line.strip() for line in message.splitlines()]
    return " ".join(line for line in lines if line and set(line) != {"^"})
