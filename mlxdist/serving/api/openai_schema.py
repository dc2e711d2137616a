"""OpenAI's chat and completion requests, checked strictly."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Unknown fields (n-best, echo, user...) are accepted and ignored, as most servers do;
# the fields below must have the right type: "5" is not a number.
_STRICT = ConfigDict(strict=True, extra="allow")


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = _STRICT
    name: str
    arguments: str  # JSON text, as the API hands it out


class CallIn(BaseModel):
    """A tool call an assistant made earlier in the conversation."""

    model_config = _STRICT
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[CallIn] | None = None  # an assistant's
    tool_call_id: str | None = None  # a tool message's: the call it answers
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class Function(BaseModel):
    model_config = _STRICT
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema
    strict: bool | None = None


class Tool(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: Function


class NamedFunction(BaseModel):
    model_config = _STRICT
    name: str


class NamedChoice(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class NullMeansDefault(BaseModel):
    """OpenAI marks most optional fields nullable and its client sends `null` for a None: such
    a field takes its default, as when it is left out (a required one stays a 400)."""

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            k: v
            for k, v in data.items()
            if v is not None or k not in fields or fields[k].is_required()
        }


class Sampling(NullMeansDefault):
    model_config = _STRICT
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name for max_tokens
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False  # mlxdist extension: the generated ids in each choice
    ignore_eos: bool = False  # as llama.cpp's server: answer max_tokens tokens (for benchmarks)
    # mlxdist extensions: this request's speculative decoding, instead of the server's
    speculative: Literal["none", "ngram", "mtp"] | None = None
    draft_tokens: int | None = Field(None, ge=1, le=16)
    # Applied where the sampler runs (mlxdist/runtime/processors.py): token id (as a string)
    # -> -100..100 added to its logit; penalties over the answer (and the prompt's tail).
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    # {"type": "text" | "json_object" | "json_schema", ...}: checked by serving/grammar.py
    response_format: dict | None = None

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_tokens is None else self.max_tokens

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else self.stop

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    # "deepseek": the text inside <think>...</think> goes to reasoning_content; "none": all of
    # it stays in content, as generated.
    reasoning_format: Literal["deepseek", "none"] = "deepseek"
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedChoice | None = None
    parallel_tool_calls: bool = True  # False: the answer keeps its first call only
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # The chat template's own switches: OpenAI's reasoning_effort (gpt-oss's template reads it;
    # "none" turns V3.1's and Qwen3's reasoning off, any other value on) and, as vLLM's server,
    # chat_template_kwargs (V3.1's `thinking`, Qwen3's `enable_thinking`, ...): plain values only.
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, bool | int | float | str] | None = None


class CompletionRequest(Sampling):
    prompt: str | list[int]
    logprobs: int | None = Field(None, ge=0, le=5)


class LogitsRequest(BaseModel):
    prompt: list[int] = Field(min_length=1)
