"""One parsed tool call, as the API hands it on."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    id: str  # the model's own when its format names calls (Kimi K2), else a fresh call_...
    name: str
    arguments: str  # a JSON object, as text


def make_call(name: object, arguments: object, call_id: object = None) -> ToolCall:
    """A ToolCall from a parser's name and arguments (a dict, or JSON text of an object);
    ValueError when either is not what a call needs."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("a tool call needs a function name")
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        raise ValueError("a tool call's arguments must be a JSON object")
    text = json.dumps(arguments, ensure_ascii=False)
    own = isinstance(call_id, str) and call_id
    return ToolCall(call_id if own else new_call_id(), name.strip(), text)
