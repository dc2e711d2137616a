"""Structured output on the request side (rank 0, no tokenizer): the three APIs' formats become
one grammar, and what llguidance cannot enforce is a GrammarError naming the feature."""

from __future__ import annotations

import anthropic
import pytest
from openai.lib._parsing._completions import type_to_response_format_param
from openai.lib._parsing._responses import type_to_text_format_param

from mlxdist.serving.grammar import (
    GrammarError,
    anthropic_format_grammar,
    chat_format_grammar,
    check_grammar,
    json_grammar,
    responses_format_grammar,
)
from mlxdist.testing.schemas import Order

POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
    "required": ["x", "y"],
    "additionalProperties": False,
}

# (schema, what the message must name)
UNSUPPORTED = [
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, '"if", "then"'),
    ({"not": {"type": "string"}}, '"not"'),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
    ({"type": "object", "propertyNames": {"pattern": "^a"}}, "propertyNames"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"type": "object", "unevaluatedProperties": False}, "unevaluatedProperties"),
    ({"type": "string", "format": "phone-number"}, "Unknown format: phone-number"),
    ({"$ref": "https://example.com/point.json"}, "https://example.com/point.json"),
    ({"$ref": "#/$defs/missing"}, "/$defs/missing"),
    ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
    ({"type": "strang"}, "strang"),
    (
        {"type": "object", "properties": {"a": {}, "b": {}}, "required": ["a"], "maxProperties": 1},
        "min/maxProperties",
    ),
]


@pytest.mark.parametrize("schema, named", UNSUPPORTED, ids=[n for _, n in UNSUPPORTED])
def test_an_unsupported_feature_is_refused_by_name(schema, named):
    with pytest.raises(GrammarError) as caught:
        json_grammar(schema, "response_format.json_schema.schema")
    message = caught.value.message
    assert named in message and "\n" not in message, message
    assert message.startswith("the JSON schema cannot be enforced: ")
    assert caught.value.param == "response_format.json_schema.schema"


@pytest.mark.parametrize("schema", [[1, 2], "object", True, 3])
def test_a_schema_that_is_not_an_object_is_refused(schema):
    with pytest.raises(GrammarError, match="must be an object"):
        json_grammar(schema)


def test_a_grammar_is_checked_as_it_is_made():
    check_grammar(json_grammar(POINT))  # no error
    with pytest.raises(GrammarError, match="cannot be enforced"):
        check_grammar('{"grammars": [{"lark_grammar": "start: nope"}]}')


def test_no_schema_is_any_object_and_no_format_is_no_grammar():
    assert json_grammar(None) == json_grammar({"type": "object"})
    for to_grammar in (chat_format_grammar, responses_format_grammar, anthropic_format_grammar):
        assert to_grammar(None) is None
    assert chat_format_grammar({"type": "text"}) is None
    assert responses_format_grammar({"type": "text"}) is None


def test_openai_chat_response_format():
    spec = {"name": "point", "schema": POINT, "strict": True}
    assert chat_format_grammar({"type": "json_schema", "json_schema": spec}) == json_grammar(POINT)
    assert chat_format_grammar({"type": "json_object"}) == json_grammar(None)
    # OpenAI's schema is optional here: any object
    no_schema = {"type": "json_schema", "json_schema": {"name": "free"}}
    assert chat_format_grammar(no_schema) == json_grammar(None)


def test_responses_text_format():
    fmt = {"type": "json_schema", "name": "point", "schema": POINT, "strict": True}
    assert responses_format_grammar(fmt) == json_grammar(POINT)
    assert responses_format_grammar({"type": "json_object"}) == json_grammar(None)


def test_anthropic_output_format():
    fmt = {"type": "json_schema", "schema": POINT}
    assert anthropic_format_grammar(fmt) == json_grammar(POINT)
    assert anthropic_format_grammar(fmt, "output_format") == json_grammar(POINT)


# (function, format, param the error names, words of its message)
MALFORMED = [
    (chat_format_grammar, "json", "response_format", "must be an object"),
    (chat_format_grammar, {"type": "xml"}, "response_format", '"text", "json_object"'),
    (chat_format_grammar, {}, "response_format", "not null"),
    (
        chat_format_grammar,
        {"type": "json_schema"},
        "response_format.json_schema",
        'needs a "json_schema" object',
    ),
    (
        chat_format_grammar,
        {"type": "json_schema", "json_schema": {"name": "p", "schema": "object"}},
        "response_format.json_schema.schema",
        "must be a JSON schema object",
    ),
    (
        chat_format_grammar,
        {"type": "json_schema", "json_schema": {"name": "p", "schema": {"not": {}}}},
        "response_format.json_schema.schema",
        '"not"',
    ),
    (responses_format_grammar, {"type": "json_schema", "name": "p"}, "text.format.schema", "must"),
    (
        responses_format_grammar,
        {"type": "json_schema", "name": "p", "schema": {"type": "array", "uniqueItems": True}},
        "text.format.schema",
        "uniqueItems",
    ),
    (anthropic_format_grammar, {"type": "json_object"}, "output_config.format", '"json_schema"'),
    (
        anthropic_format_grammar,
        {"type": "json_schema", "schema": {"type": "string", "format": "zip"}},
        "output_config.format.schema",
        "Unknown format: zip",
    ),
]


@pytest.mark.parametrize("to_grammar, fmt, param, words", MALFORMED)
def test_a_malformed_format_names_its_field(to_grammar, fmt, param, words):
    with pytest.raises(GrammarError) as caught:
        to_grammar(fmt)
    assert caught.value.param == param
    assert words in caught.value.message and "\n" not in caught.value.message


def test_the_official_clients_schemas_are_accepted():
    """What openai's and anthropic's clients send for a pydantic model (nested models through
    $defs, Optional as anyOf with null, enums, Literal) becomes a grammar in each API's shape."""
    chat = chat_format_grammar(type_to_response_format_param(Order))
    responses = responses_format_grammar(type_to_text_format_param(Order))
    assert chat == responses  # the same strict schema, held in two shapes
    claude = anthropic.transform_schema(Order)
    assert anthropic_format_grammar({"type": "json_schema", "schema": claude})


def test_each_shape_passes_the_end_of_thinking_on():
    """For a prompt that leaves the model inside a think block: the same grammar as
    json_grammar's with the `</think>` token's id."""
    fmt = {"type": "json_schema", "schema": POINT}
    thinking = json_grammar(POINT, think_end=128799)
    assert thinking != json_grammar(POINT) and "<[128799]>" in thinking
    chat = {"type": "json_schema", "json_schema": {"name": "p", "schema": POINT}}
    assert chat_format_grammar(chat, 128799) == thinking
    assert responses_format_grammar(fmt | {"name": "p"}, 128799) == thinking
    assert anthropic_format_grammar(fmt, think_end=128799) == thinking
    with pytest.raises(GrammarError, match='"not"'):  # refused alike
        json_grammar({"not": {}}, think_end=128799)
