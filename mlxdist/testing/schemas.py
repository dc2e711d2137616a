"""JSON schemas for structured output's tests, one table: the grammar's unit tests sample them
over random logits, the cluster tests through real ranks; every answer must parse and validate.

Every string has a maxLength (or an enum, const, format or pattern that bounds it), every array a
maxItems and every integer bounds, so that an answer fits in about 200 tokens whatever the model
prefers; the open cases are `json_object` mode (no schema: any object) and the extra keys of
additional_properties_schema.

Greedy SmolLM2 under the mask (benchmarks/grammar_answers.py), asked for each schema ("Reply
with a JSON object for this schema: ..."), answered every schema but any_object validly in 1 to
53 tokens (451 in all); any_object it had not ended after 300 (one string of repeated words).
The grammar does not keep extra keys apart: SmolLM2 wrote {"type":1,"pattern":1,"pattern":1}
for pattern_properties_min_max (JSON allows it; a parser keeps the last).
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

import pydantic

NAME = {"type": "string", "minLength": 1, "maxLength": 16}
SHORT = {"type": "string", "maxLength": 12}
AGE = {"type": "integer", "minimum": 0, "maximum": 120}


def _object(properties: dict, required: list[str] | None = None, closed: bool = True) -> dict:
    schema = {"type": "object", "properties": properties}
    schema["required"] = list(properties) if required is None else required
    if closed:
        schema["additionalProperties"] = False
    return schema


# (name, schema): the name says what the schema exercises.
SCHEMAS: list[tuple[str, dict | None]] = [
    ("any_object", None),
    ("one_string", _object({"answer": SHORT})),
    ("one_integer_bounded", _object({"n": {"type": "integer", "minimum": -5, "maximum": 5}})),
    (
        "integer_exclusive",
        _object({"n": {"type": "integer", "exclusiveMinimum": 0, "maximum": 50}}),
    ),
    ("number_bounded", _object({"x": {"type": "number", "minimum": 0, "maximum": 1}})),
    ("number_exclusive", _object({"t": {"type": "number", "exclusiveMinimum": -1, "maximum": 3}})),
    ("boolean", _object({"ok": {"type": "boolean"}})),
    ("null_only", _object({"nothing": {"type": "null"}})),
    ("enum_strings", _object({"color": {"enum": ["red", "green", "blue"]}})),
    ("enum_mixed", _object({"level": {"enum": [1, "two", None, True]}})),
    ("const", _object({"version": {"const": 2}, "kind": {"const": "point"}})),
    ("string_min_max", _object({"code": {"type": "string", "minLength": 3, "maxLength": 5}})),
    ("string_pattern", _object({"id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}})),
    (
        "string_formats",
        _object(
            {
                "day": {"type": "string", "format": "date"},
                "uid": {"type": "string", "format": "uuid"},
            }
        ),
    ),
    ("required_and_optional", _object({"name": NAME, "age": AGE, "nick": SHORT}, ["name"])),
    (
        "person",
        _object(
            {
                "name": NAME,
                "age": AGE,
                "email": {"type": "string", "format": "email", "maxLength": 24},
            }
        ),
    ),
    (
        "nested_object",
        _object({"user": _object({"name": NAME, "age": AGE}), "active": {"type": "boolean"}}),
    ),
    (
        "nested_three_deep",
        _object(
            {"a": _object({"b": _object({"c": {"type": "integer", "minimum": 0, "maximum": 9}})})}
        ),
    ),
    (
        "array_of_integers",
        _object(
            {
                "xs": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 99},
                    "maxItems": 5,
                }
            }
        ),
    ),
    (
        "array_min_max_items",
        _object({"tags": {"type": "array", "items": SHORT, "minItems": 2, "maxItems": 3}}),
    ),
    (
        "array_exact_items",
        _object(
            {
                "rgb": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 255},
                    "minItems": 3,
                    "maxItems": 3,
                }
            }
        ),
    ),
    (
        "array_of_objects",
        _object(
            {
                "people": {
                    "type": "array",
                    "items": _object({"name": NAME, "age": AGE}),
                    "minItems": 1,
                    "maxItems": 3,
                }
            }
        ),
    ),
    (
        "array_of_enums",
        _object(
            {"days": {"type": "array", "items": {"enum": ["mon", "tue", "wed"]}, "maxItems": 4}}
        ),
    ),
    (
        "tuple_prefix_items",
        _object({"pair": {"type": "array", "prefixItems": [SHORT, AGE], "items": False}}),
    ),
    (
        "top_level_array",
        {"type": "array", "items": _object({"k": SHORT}), "minItems": 1, "maxItems": 2},
    ),
    (
        "any_of",
        _object({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, SHORT]}}),
    ),
    (
        "any_of_objects",
        _object(
            {
                "shape": {
                    "anyOf": [
                        _object({"kind": {"const": "circle"}, "r": AGE}),
                        _object({"kind": {"const": "square"}, "side": AGE}),
                    ]
                }
            }
        ),
    ),
    (
        "one_of",
        _object(
            {
                "id": {
                    "oneOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}]
                }
            }
        ),
    ),
    ("nullable_type_list", _object({"middle": {"type": ["string", "null"], "maxLength": 10}})),
    (
        "nullable_any_of",
        _object(
            {
                "score": {
                    "anyOf": [{"type": "integer", "minimum": 0, "maximum": 10}, {"type": "null"}]
                }
            }
        ),
    ),
    (
        "all_of",
        {  # closed at the top: an open object lets a model add keys without end
            "type": "object",
            "properties": {"a": AGE, "b": SHORT},
            "additionalProperties": False,
            "allOf": [
                {"properties": {"a": AGE}, "required": ["a"]},
                {"properties": {"b": SHORT}, "required": ["b"]},
            ],
        },
    ),
    (
        "defs_ref",
        {
            "$defs": {"point": _object({"x": AGE, "y": AGE})},
            **_object({"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}}),
        },
    ),
    (
        "additional_properties_schema",
        {
            "type": "object",
            "properties": {"id": AGE},
            "required": ["id"],
            "additionalProperties": {"type": "boolean"},
            "maxProperties": 3,
        },
    ),
    (
        "pattern_properties_min_max",
        {
            "type": "object",
            "patternProperties": {"^[a-z]{1,8}$": AGE},
            "additionalProperties": False,
            "minProperties": 1,
            "maxProperties": 3,
        },
    ),
    ("no_required", _object({"a": SHORT, "b": AGE}, [])),
    ("empty_object", _object({})),
    (
        "openai_strict_style",
        _object(
            {
                "city": NAME,
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": ["integer", "null"], "minimum": 1, "maximum": 7},
            }
        ),
    ),
]


# A pydantic model, for the clients' own structured output helpers (openai's `parse`, which
# sends a strict schema with $defs, Optional as anyOf with null, enums and a Literal; anthropic's
# transform_schema, which moves the bounds into descriptions): answers must validate as an Order.
class Size(str, Enum):
    small = "small"
    large = "large"


class Item(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=16)
    count: int = pydantic.Field(ge=0, le=99)
    size: Size
    note: str | None = pydantic.Field(max_length=12)


class Order(pydantic.BaseModel):
    id: int = pydantic.Field(ge=0, le=9999)
    items: list[Item] = pydantic.Field(min_length=1, max_length=3)
    status: Literal["open", "closed"]
    shipping: Item | None
