"""Splits a model's output into its reasoning (inside <think>...</think>) and its answer.

As DeepSeek's own API: `reasoning_content` is the text between the tags as generated, `content`
the text after `</think>` without the whitespace that follows the tag (R1 writes a blank line).
The output may begin inside the block (the prompt ended with `<think>`, as R1's, MiniMax-M2's
and the Qwen3 thinking models' templates do) or open it itself (Qwen3, GLM-4.5, Kimi K2); only a
block at the start counts, a later `<think>` is part of the answer. A template that turns thinking
off ends the prompt with an empty block (`<think></think>`), so the output is all answer.

gpt-oss writes harmony channels instead (serving/harmony.py); which of the two a model speaks
shows in its chat template's generation prompt, so reasoning_start() reads it there.
"""

from __future__ import annotations

from typing import Literal

from mlxdist.serving.harmony import HarmonySplitter, prompt_opens_harmony

OPEN, CLOSE = "<think>", "</think>"

# Where the output begins: in the answer (a think block may still open), inside a think block,
# or at the head of a harmony message.
Start = Literal["answer", "think", "harmony"]

_START, _THINK, _AFTER, _CONTENT = "start", "think", "after", "content"


def prompt_opens_think(prompt_text: str) -> bool:
    """True when the prompt leaves the model inside a think block."""
    return prompt_text.rstrip().endswith(OPEN)


def reasoning_start(prompt_text: str) -> Start:
    """How the output that follows this chat prompt begins."""
    if prompt_opens_harmony(prompt_text):
        return "harmony"
    return "think" if prompt_opens_think(prompt_text) else "answer"


def make_splitter(start: Start) -> ReasoningSplitter | HarmonySplitter:
    if start == "harmony":
        return HarmonySplitter()
    return ReasoningSplitter(in_think=start == "think")


def _held_suffix(text: str, tag: str) -> int:
    """Length of the longest end of text that could be the start of tag."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Fed the output piece by piece, returns (reasoning, content) for each piece.

    A tag cut across pieces ("</thi" + "nk>") is held back until it is whole or cannot be one.
    """

    def __init__(self, in_think: bool = False):
        self.state = _THINK if in_think else _START
        self.held = ""

    @property
    def thinking(self) -> bool:
        return self.state == _THINK

    def feed(self, text: str) -> tuple[str, str]:
        buf, self.held = self.held + text, ""
        reasoning, content = [], []
        while buf:
            if self.state == _START:
                lead = buf.lstrip()
                if lead.startswith(OPEN):
                    self.state, buf = _THINK, lead[len(OPEN) :]
                elif OPEN.startswith(lead):  # whitespace, or a tag not yet whole
                    self.held, buf = buf, ""
                else:
                    self.state = _CONTENT
            elif self.state == _THINK:
                end = buf.find(CLOSE)
                if end >= 0:
                    reasoning.append(buf[:end])
                    self.state, buf = _AFTER, buf[end + len(CLOSE) :]
                else:
                    keep = _held_suffix(buf, CLOSE)
                    reasoning.append(buf[: len(buf) - keep])
                    self.held, buf = buf[len(buf) - keep :], ""
            elif self.state == _AFTER:
                buf = buf.lstrip()
                if buf:
                    self.state = _CONTENT
            else:
                content.append(buf)
                buf = ""
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """What was held back, once the output has ended."""
        held, self.held = self.held, ""
        return (held, "") if self.state == _THINK else ("", held)
