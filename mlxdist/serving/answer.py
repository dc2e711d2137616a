"""The generated text of one answer split into reasoning, content and tool calls, whatever the API.

Fed piece by piece (streaming) or at once, it returns what each piece adds; every API formats it
its own way (OpenAI's reasoning_content and tool_calls, Anthropic's thinking and tool_use blocks).
The reasoning comes off first (serving/reasoning.py); tool calls are looked for in the content
only, in the model's own format (serving/tool_calls.py); a call that does not parse stays text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxdist.serving.reasoning import Start, make_splitter
from mlxdist.serving.tool_calls import HARMONY, ToolCall, ToolCallSplitter


@dataclass
class Piece:
    """What one piece of output adds: reasoning text, content text, tool calls completed."""

    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def __add__(self, other: Piece) -> Piece:
        return Piece(
            self.reasoning + other.reasoning, self.content + other.content, self.calls + other.calls
        )


class Answer:
    """think: how the output begins (serving/reasoning.py), None: no reasoning split, all content.
    tool_format: the model's call format (tool_format()), None: no calls looked for; tools: the
    request's, for parsers that read their schemas."""

    def __init__(
        self,
        think: Start | None = None,
        tool_format: str | None = None,
        tools=None,
        single_call: bool = False,
    ) -> None:
        self.think = think
        self.single_call = single_call  # parallel tool calls off: the first call only
        self.splitter = None if think is None else make_splitter(think)
        self.calls_splitter = ToolCallSplitter(tool_format, tools) if tool_format else None
        # gpt-oss's calls are harmony messages, which its reasoning splitter reads
        self.harmony_calls = tool_format == HARMONY and hasattr(self.splitter, "take_calls")
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: list[ToolCall] = []
        self.reasoning_tokens = 0

    def token(self, text: str) -> Piece:
        """One generated token's text (counted as reasoning while inside the reasoning)."""
        if self.splitter is not None and self.splitter.thinking:
            self.reasoning_tokens += 1
        return self.feed(text)

    def feed(self, text: str) -> Piece:
        if self.splitter is None:
            return self._keep("", text)
        return self._keep(*self.splitter.feed(text))

    def finish(self, text: str = "") -> Piece:
        """The last text (held back till the end), then whatever the splitters still hold."""
        piece = self.feed(text)
        if self.splitter is not None:
            piece = piece + self._keep(*self.splitter.finish())
        if self.calls_splitter is not None:
            content, calls = self.calls_splitter.finish()
            piece = piece + self._add(Piece("", content, calls))
        return piece

    def _keep(self, reasoning: str, content: str) -> Piece:
        calls: list[ToolCall] = []
        if self.calls_splitter is not None and content:
            content, calls = self.calls_splitter.feed(content)
        if self.harmony_calls:
            calls = self.splitter.take_calls() + calls
        elif hasattr(self.splitter, "take_calls"):  # calls not asked for: their text is answer
            content += "".join(c.arguments for c in self.splitter.take_calls())
        return self._add(Piece(reasoning, content, calls))

    def _add(self, piece: Piece) -> Piece:
        if self.single_call and piece.calls:  # parallel calls off: the first call only
            piece = Piece(piece.reasoning, piece.content, piece.calls[: 1 - len(self.calls)])
        self.reasoning.append(piece.reasoning)
        self.content.append(piece.content)
        self.calls.extend(piece.calls)
        return piece

    def whole(self) -> Piece:
        return Piece("".join(self.reasoning), "".join(self.content), list(self.calls))
