"""Splits gpt-oss's harmony output into its reasoning and its answer.

gpt-oss answers in messages, each a header then `<|message|>` then a body: the header names the
channel (`<|channel|>analysis`, `<|channel|>final`, `<|channel|>commentary to=...`), the body ends
with `<|end|>` (another message follows, from `<|start|>assistant`), `<|return|>` (the answer is
done) or `<|call|>` (a tool call). The analysis channel's bodies are the reasoning; every other
channel's bodies are the answer. The prompt ends at `<|start|>assistant`, so the output begins in a
header; an output that does not begin with a marker is all answer.

A message whose header names a function as its recipient is a tool call, its body the arguments:
`<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>` (the recipient
may also come before the channel). Its body is neither reasoning nor answer: take_calls() hands
the calls over. `<|call|>` is an end token, so the output usually stops before it and finish()
completes the call. A call whose body is not a JSON object is answer text.
Source: OpenAI's harmony format guide, "Function calling"
(cookbook.openai.com/articles/openai-harmony).
"""

from __future__ import annotations

import re

from mlxdist.serving.tools.call import ToolCall, make_call

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
BODY_ENDS = ("<|end|>", "<|return|>", "<|call|>")
DONE_ENDS = ("<|return|>", "<|call|>")
REASONING_CHANNEL = "analysis"

_HEADER, _BODY, _PLAIN, _DONE = "header", "body", "plain", "done"
_RECIPIENT = re.compile(r"to=functions\.([^<]+)")  # a name may hold a space: "Web Search"


def prompt_opens_harmony(prompt_text: str) -> bool:
    """True when the prompt leaves the model at the head of an assistant message."""
    return prompt_text.rstrip().endswith(START + "assistant")


def channel_of(header: str) -> str:
    """The channel a header names: `<|start|>assistant<|channel|>final` -> "final"."""
    _, sep, rest = header.partition(CHANNEL)
    if not sep:
        return ""
    return rest.split("<|")[0].split()[0] if rest.strip() else ""


def function_of(header: str) -> str | None:
    """The function a header addresses (`... to=functions.get_weather ...`), if any."""
    m = _RECIPIENT.search(header)
    return m.group(1).strip() if m else None


def _held_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest end of text that could be the start of one of tags."""
    longest = max(len(t) for t in tags) - 1
    for n in range(min(len(text), longest), 0, -1):
        if any(t.startswith(text[-n:]) for t in tags):
            return n
    return 0


class HarmonySplitter:
    """Fed the output piece by piece, returns (reasoning, content) for each piece; a marker cut
    across pieces is held back until it is whole or cannot be one."""

    def __init__(self) -> None:
        self.state = _HEADER
        self.header = ""
        self.channel = ""
        self.held = ""
        self.bodies = 0  # messages begun: only before the first can the output be plain text
        self.function: str | None = None  # the function the current message calls
        self.arguments = ""  # that call's body so far
        self.calls: list[ToolCall] = []  # completed calls not yet taken

    def take_calls(self) -> list[ToolCall]:
        """The tool calls completed since the last take."""
        calls, self.calls = self.calls, []
        return calls

    def _end_call(self, content: list[str]) -> None:
        body, name = self.arguments, self.function
        self.arguments, self.function = "", None
        try:
            self.calls.append(make_call(name, body.strip()))
        except ValueError:  # not a JSON object (json's errors are ValueErrors too)
            content.append(body)

    @property
    def thinking(self) -> bool:
        return self.state == _BODY and self.channel == REASONING_CHANNEL and self.function is None

    def feed(self, text: str) -> tuple[str, str]:
        buf, self.held = self.held + text, ""
        reasoning, content = [], []
        while buf:
            if self.state == _HEADER:
                whole = self.header + buf
                head = whole.lstrip()
                if not head:  # whitespace only: wait for what follows
                    self.held, self.header, buf = whole, "", ""
                    continue
                if not (head.startswith("<|") or "<|".startswith(head)):
                    # no marker: the model answered plainly, whitespace and all
                    self.state, self.header, buf = _PLAIN, "", whole
                    continue
                end = head.find(MESSAGE)
                if end < 0:
                    self.header, buf = head, ""
                    continue
                self.channel = channel_of(head[:end])
                self.function = function_of(head[:end])
                self.state, self.header, buf = _BODY, "", head[end + len(MESSAGE) :]
                self.bodies += 1
            elif self.state == _BODY:
                hits = [(i, t) for t in BODY_ENDS if (i := buf.find(t)) >= 0]
                i, tag = min(hits) if hits else (len(buf) - _held_suffix(buf, BODY_ENDS), "")
                if self.function is not None:  # a call's arguments: neither kind of text
                    self.arguments += buf[:i]
                else:
                    (reasoning if self.channel == REASONING_CHANNEL else content).append(buf[:i])
                if not tag:
                    self.held, buf = buf[i:], ""
                    continue
                if self.function is not None:
                    self._end_call(content)
                buf = buf[i + len(tag) :]
                self.state = _DONE if tag in DONE_ENDS else _HEADER
            elif self.state == _PLAIN:
                content.append(buf)
                buf = ""
            else:  # after <|return|> or <|call|>: nothing more belongs to the answer
                buf = ""
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """What was held back, once the output has ended."""
        held, self.held = self.held, ""
        if self.state == _BODY and self.function is not None:  # stopped at <|call|>
            self.arguments += held
            content: list[str] = []
            self._end_call(content)
            return "", "".join(content)
        if self.state == _BODY and self.channel == REASONING_CHANNEL:
            return held, ""
        if self.state == _HEADER:  # a header cut off is no answer, nor is a marker's first "<"
            plain = not self.bodies and not self.header.startswith("<|")
            return ("", self.header or held) if plain else ("", "")
        return ("", held) if self.state in (_BODY, _PLAIN) else ("", "")
