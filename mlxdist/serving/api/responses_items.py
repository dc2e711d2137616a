"""The Responses API's items (a request's input, a stored response's output) as chat-template
messages.

- a message: `{"role", "content"}` (`"type": "message"` optional), content a string or parts
  (`input_text`, `output_text`, `refusal`, `text`); "developer" is rendered as "system";
- `function_call` items join the assistant message before them (or make one) as its tool calls;
- `function_call_output` items become tool messages;
- a `reasoning` item's text (its `reasoning_text` content, else its summary) becomes the next
  assistant message's reasoning (templates that keep none drop it).
"""

from __future__ import annotations

import json

from mlxdist.serving.api.errors import APIError
from mlxdist.serving.api.turn import call_message

ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


def _fault(param: str, why: str) -> APIError:
    return APIError(400, f"{param}: {why}", param)


def _string(item: dict, key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise _fault(f"{param}.{key}", "must be a string")
    return value


def _text(content: object, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _fault(f"{param}.content", "must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        where = f"{param}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            why = "this server's models read text only" if isinstance(kind, str) else "no type"
            raise _fault(where, f"a part of type {kind!r} is not supported: {why}")
        texts.append(_string(part, "refusal" if kind == "refusal" else "text", where))
    return "".join(texts)


def _reasoning_text(item: dict, param: str) -> str:
    for key, kind in (("content", "reasoning_text"), ("summary", "summary_text")):
        parts = item.get(key) or []
        if not isinstance(parts, list):
            raise _fault(f"{param}.{key}", "must be a list")
        texts = [p.get("text") for p in parts if isinstance(p, dict) and p.get("type") == kind]
        if texts and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    return ""


def chat_messages(items: list, as_dict: bool, param: str = "input") -> list[dict]:
    """as_dict: a call's arguments as a dict (the template's convention, turn.py)."""
    out: list[dict] = []
    reasoning = ""
    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise _fault(where, "an item must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise _fault(f"{where}.role", f"must be one of {', '.join(ROLES)}")
            message = {"role": "system" if role == "developer" else role}
            message["content"] = _text(item.get("content"), where)
            if role == "assistant" and reasoning:
                message["reasoning_content"], reasoning = reasoning, ""
            out.append(message)
        elif kind == "function_call":
            name, call_id = _string(item, "name", where), _string(item, "call_id", where)
            try:
                # "" for a call with no arguments, as some models and clients write it
                arguments = json.loads(_string(item, "arguments", where) or "{}")
            except (ValueError, RecursionError):  # nested past Python's limit too
                arguments = None
            if not isinstance(arguments, dict):
                raise _fault(f"{where}.arguments", "not a JSON object")
            last = out[-1] if out else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": None}
                out.append(last)
            if reasoning:
                last["reasoning_content"], reasoning = reasoning, ""
            calls = call_message([(call_id, name, arguments)], as_dict)
            last["tool_calls"] = last.get("tool_calls", []) + calls
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text(output, where)
            call_id = _string(item, "call_id", where)
            out.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind == "reasoning":
            reasoning += _reasoning_text(item, where)
        else:
            raise _fault(f"{where}.type", f"an item of type {kind!r} is not supported here")
    return out
