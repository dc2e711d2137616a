"""OpenAI Responses requests (POST /v1/responses), checked strictly; unknown fields (include,
truncation, user, prompt_cache_key...) are accepted and ignored. The input items are checked
where they become chat messages (responses_items.py), each fault naming its item."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mlxdist.serving.api.openai_schema import NullMeansDefault

_STRICT = ConfigDict(strict=True, extra="allow")


class FunctionTool(BaseModel):
    model_config = _STRICT
    type: str  # "function"; OpenAI's hosted tools (web_search, file_search...) are refused
    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class NamedChoice(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    name: str


class TextConfig(BaseModel):
    model_config = _STRICT
    format: dict | None = None  # {"type": "text" | "json_object" | "json_schema", ...}


class ReasoningConfig(BaseModel):
    model_config = _STRICT
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: str | None = None  # accepted; the reasoning is given whole, never summarised


class ResponsesRequest(NullMeansDefault):
    model_config = _STRICT
    model: str | None = None
    input: str | list[dict]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedChoice | None = None
    parallel_tool_calls: bool = True  # False: the answer keeps its first call only
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
