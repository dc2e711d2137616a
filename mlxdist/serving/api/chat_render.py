"""An OpenAI chat's messages and tools as a chat template takes them.

Assistant messages keep their `tool_calls`, tool messages their `tool_call_id`. Templates differ
on a call's `arguments`: OpenAI sends JSON text, Hugging Face's convention is a dict (Llama 3.1's
template writes `arguments | tojson`, GLM's walks `arguments.items()`), and DeepSeek's templates
print the text as it is. So the arguments go as a dict unless the template prints them raw.
"""

from __future__ import annotations

import json
import re

from mlxdist.serving.api.errors import APIError
from mlxdist.serving.api.openai_schema import Message, Tool

# `{{ x.arguments }}`, `... + x['arguments'] + ...` (R1-0528's), `x.arguments is string` (Qwen3's,
# tiny-r1's: they write a dict with tojson otherwise).
_AS_TEXT = re.compile(r"""arguments['"]?\s*\]?\s*(?:\+|~|-?}}|is\s+string)""")


def arguments_as_dict(template: str | None) -> bool:
    return not (isinstance(template, str) and _AS_TEXT.search(template))


def template_messages(messages: list[Message], as_dict: bool) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        message: dict = {"role": role, "content": m.text()}
        if m.role == "assistant" and m.tool_calls:
            # R1-0528's template writes content before the calls only when it is not None.
            message["content"] = None if m.content is None else m.text()
            message["tool_calls"] = [
                _call(c, as_dict, f"messages[{i}].tool_calls[{j}]")
                for j, c in enumerate(m.tool_calls)
            ]
        if m.role == "tool":
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                message["name"] = m.name
        out.append(message)
    return out


def _call(call, as_dict: bool, param: str) -> dict:
    arguments: str | dict = call.function.arguments
    if as_dict:
        try:
            arguments = json.loads(arguments or "{}")  # "": a call with no arguments
        except (ValueError, RecursionError):  # nested past Python's limit: not an object either
            arguments = None
        if not isinstance(arguments, dict):
            raise APIError(
                400, f"{param}.function.arguments: not a JSON object", param + ".function.arguments"
            )
    body = {"type": "function", "function": {"name": call.function.name, "arguments": arguments}}
    return ({"id": call.id} if call.id is not None else {}) | body


def template_tools(tools: list[Tool]) -> list[dict]:
    return [t.model_dump(exclude_none=True) for t in tools]


def effort_switches(effort: str | None) -> dict:
    """A reasoning effort as the chat template's switches: V3.1's and Qwen3's templates turn
    reasoning on or off themselves ("none": off); gpt-oss's reads the effort."""
    if effort is None:
        return {}
    on = effort != "none"
    return {"thinking": on, "enable_thinking": on} | ({"reasoning_effort": effort} if on else {})
