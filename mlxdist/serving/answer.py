"""The generated text of one answer split into its reasoning and its content, whatever the API.

Fed piece by piece (streaming) or at once, it returns each piece's reasoning and content; every
API formats them its own way (OpenAI's reasoning_content, Anthropic's thinking blocks...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxdist.serving.reasoning import Start, make_splitter


@dataclass
class Piece:
    """What one piece of output adds: reasoning text, content text."""

    reasoning: str = ""
    content: str = ""

    def __add__(self, other: Piece) -> Piece:
        return Piece(self.reasoning + other.reasoning, self.content + other.content)


@dataclass
class Answer:
    """think: how the output begins (serving/reasoning.py), None: no splitting, all content."""

    think: Start | None = None
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    reasoning_tokens: int = 0

    def __post_init__(self) -> None:
        self.splitter = None if self.think is None else make_splitter(self.think)

    def token(self, text: str) -> Piece:
        """One generated token's text (counted as reasoning while inside the reasoning)."""
        if self.splitter is not None and self.splitter.thinking:
            self.reasoning_tokens += 1
        return self.feed(text)

    def feed(self, text: str) -> Piece:
        if self.splitter is None:
            return self._keep(Piece("", text))
        return self._keep(Piece(*self.splitter.feed(text)))

    def finish(self, text: str = "") -> Piece:
        """The last text (held back till the end) and whatever the splitter still holds."""
        piece = self.feed(text)
        if self.splitter is not None:
            piece = piece + self._keep(Piece(*self.splitter.finish()))
        return piece

    def _keep(self, piece: Piece) -> Piece:
        self.reasoning.append(piece.reasoning)
        self.content.append(piece.content)
        return piece

    def whole(self) -> Piece:
        return Piece("".join(self.reasoning), "".join(self.content))
