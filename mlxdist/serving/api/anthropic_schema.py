"""Anthropic Messages requests (POST /v1/messages and /v1/messages/count_tokens), checked
strictly: a field of the wrong type is a 400, unknown fields are accepted and ignored (cache
control, citations, service tiers...)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(strict=True, extra="allow")


class TextBlock(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ImageBlock(BaseModel):
    """Accepted by the schema so that the refusal can say why (no model here sees images)."""

    model_config = _STRICT
    type: Literal["image", "document", "search_result"]


class ToolUseBlock(BaseModel):
    model_config = _STRICT
    type: Literal["tool_use"]
    id: str
    name: str = Field(min_length=1)
    input: dict


class ToolResultBlock(BaseModel):
    model_config = _STRICT
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock] | None = None
    is_error: bool = False

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(b.text for b in self.content if isinstance(b, TextBlock))
        return self.content or ""


class ThinkingBlock(BaseModel):
    model_config = _STRICT
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None  # handed back as given; never checked here


class RedactedThinkingBlock(BaseModel):
    model_config = _STRICT
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(BaseModel):
    model_config = _STRICT
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    input_schema: dict | None = None
    type: str | None = None  # "custom" (or none); Anthropic's server tools are refused


class ToolChoice(BaseModel):
    model_config = _STRICT
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False  # True: the answer keeps its first call only


class Thinking(BaseModel):
    model_config = _STRICT
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(None, ge=0)  # R1: enforced (the block closes)
    display: Literal["summarized", "omitted"] | None = None  # omitted: no thinking blocks

    def shown(self) -> bool:
        return self.type != "disabled" and self.display != "omitted"


class Conversation(BaseModel):
    """What count_tokens and messages share: the prompt."""

    model_config = _STRICT
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None

    def system_text(self) -> str | None:
        if isinstance(self.system, list):
            return "\n\n".join(b.text for b in self.system)
        return self.system


class MessagesRequest(Conversation):
    max_tokens: int = Field(ge=1)
    temperature: float = Field(0.0, ge=0.0, le=1.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)  # accepted and ignored: the sampler has no top-k
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: dict | None = None  # {"user_id": ...}: accepted and ignored
    # structured output: {"format": {"type": "json_schema", "schema": {...}}}, or the beta's
    # top-level output_format
    output_config: dict | None = None
    output_format: dict | None = None
