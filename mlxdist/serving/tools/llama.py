"""Llama 3.1-3.3's JSON tool calls, which have no markers: the answer is the call.

Meta's template asks for `{"name": function name, "parameters": dictionary of argument name and
its value}` and renders an assistant's calls back so (meta-llama/Llama-3.1-8B-Instruct,
tokenizer_config.json chat_template: '{"name": "' + tool_call.name + '", "parameters": ' +
arguments | tojson + '}'); the built-in tools' calls begin with <|python_tag|>. mlx-lm has no
parser for it. An answer whose first non-blank text is `{` (or <|python_tag|>) is held to its end
and read as one call or more (separated by `;`); if it does not read so, it is content.
"""

from __future__ import annotations

import json

from mlxdist.serving.tools.call import ToolCall, make_call

PYTHON_TAG = "<|python_tag|>"
LLAMA3_JSON = "llama3_json"


def parse_calls(text: str) -> list[ToolCall]:
    """`{"name": ..., "parameters": {...}}` (`; ` between calls) -> calls; ValueError if not."""
    text = text.strip().removeprefix(PYTHON_TAG)
    decoder = json.JSONDecoder()
    calls, pos = [], 0
    while True:
        while pos < len(text) and text[pos] in " \n\t;":
            pos += 1
        if pos == len(text):
            break
        obj, pos = decoder.raw_decode(text, pos)
        if not isinstance(obj, dict) or set(obj) - {"name", "parameters", "arguments"}:
            raise ValueError("not a Llama tool call")
        calls.append(make_call(obj.get("name"), obj.get("parameters", obj.get("arguments", {}))))
    if not calls:
        raise ValueError("no call")
    return calls


class LeadingJsonSplitter:
    """Content as it comes when the answer does not begin as a call; otherwise held whole and
    read at the end."""

    def __init__(self) -> None:
        self.held = ""
        self.mode = ""  # "", "text" or "call"

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if self.mode == "text":
            return text, []
        self.held += text
        lead = self.held.lstrip()
        if not lead or (self.mode == "" and PYTHON_TAG.startswith(lead)):
            return "", []  # blank so far, or the tag not yet whole
        if self.mode == "" and not (lead.startswith("{") or lead.startswith(PYTHON_TAG)):
            self.mode, held, self.held = "text", self.held, ""
            return held, []
        self.mode = "call"
        return "", []

    def finish(self) -> tuple[str, list[ToolCall]]:
        held, self.held = self.held, ""
        if self.mode != "call":
            return held, []
        try:
            return "", parse_calls(held)
        except ValueError:  # json's errors are ValueErrors too
            return held, []
