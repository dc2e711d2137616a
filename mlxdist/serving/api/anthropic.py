"""POST /v1/messages: Anthropic's Messages API, whole or streamed; and
POST /v1/messages/count_tokens.

The conversation goes through the model's own chat template: `system` first, each turn's text
blocks joined, an assistant's `tool_use` blocks as its tool calls, a user's `tool_result` blocks
as tool messages before its text, earlier `thinking` blocks as the turn's reasoning (templates
that keep none drop it). The answer comes back as blocks in the order the model wrote them:
`thinking` (the model's reasoning, R1's <think> block), `text`, `tool_use`.

- `thinking`: absent, the model reasons as its template has it and the reasoning is shown;
  "enabled" / "disabled" also switch the template's own `thinking` / `enable_thinking` (V3.1,
  Qwen3); "disabled" closes a think block the prompt still opens (R1's always does) empty, so
  the model answers at once, and leaves any reasoning out of the answer (as `display:
  "omitted"` does). `budget_tokens` is enforced where the answer begins inside a think block
  that a `</think>` token ends (R1): after that many tokens the sampling rank allows only that
  token; elsewhere max_tokens bounds reasoning and answer together.
- `tool_choice`: auto, none, any (a call is forced by a grammar of the model's call format),
  tool (a call of that tool forced).
- `temperature` defaults to 0 (greedy), as this server's OpenAI chat does; `top_k` and
  `metadata` are accepted and ignored.
- Errors come in Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`, with the
  status its clients expect; once a stream has begun, as an `error` event.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from mlxdist.serving.api.anthropic_schema import (
    Conversation,
    ImageBlock,
    MessagesRequest,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from mlxdist.serving.api.anthropic_stream import Blocks, sse
from mlxdist.serving.api.context import Context, Params
from mlxdist.serving.api.errors import APIError, validation_error
from mlxdist.serving.api.sampling import make_extras, refused
from mlxdist.serving.api.turn import (
    Turn,
    call_message,
    function_tool,
    prepare,
    stop_sequence,
    template_takes_dicts,
)
from mlxdist.serving.events import Done, Token
from mlxdist.serving.grammar import GrammarError, anthropic_format_grammar
from mlxdist.serving.job import Job
from mlxdist.serving.reasoning import CLOSE

KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(status: int, message: str) -> dict:
    kind = KINDS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message), status_code=e.status)


async def read_request(request: Request, model: type[BaseModel]):
    """The body as `model`; its faults as APIError (400), never FastAPI's OpenAI-shaped ones."""
    body = await request.body()
    try:
        data = json.loads(body)
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # "[[[[..." nested past Python's stack
        raise APIError(400, "the request body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *_plain(err["loc"]))} for err in e.errors()]
        raise validation_error(errors) from None


def _plain(loc: tuple) -> tuple:
    # pydantic names the union member it tried ("str", "list[...]", "tagged-union[...]")
    return tuple(x for x in loc if not (isinstance(x, str) and ("[" in x or x == "str")))


def chat_messages(req: Conversation, as_dict: bool) -> list[dict]:
    """The conversation as chat-template messages. as_dict: a call's arguments as a dict."""
    out: list[dict] = []
    if (system := req.system_text()) is not None:
        out.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts, thinking, calls = [], [], []
        for j, block in enumerate(m.content):
            param = f"messages[{i}].content[{j}]"
            match block:
                case TextBlock():
                    texts.append(block.text)
                case ImageBlock():
                    why = "this server's models read text only"
                    raise APIError(400, f"{param}: {block.type} blocks are not supported: {why}")
                case ToolUseBlock() | ThinkingBlock() if m.role != "assistant":
                    raise APIError(400, f"{param}: {block.type} blocks belong in assistant turns")
                case ToolResultBlock() if m.role != "user":
                    raise APIError(400, f"{param}: tool_result blocks belong in user turns")
                case ToolUseBlock():
                    calls.append((block.id, block.name, block.input))
                case ThinkingBlock():
                    thinking.append(block.thinking)
                case ToolResultBlock():
                    text = ("Error: " if block.is_error else "") + block.text()
                    out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": text})
                case RedactedThinkingBlock():
                    pass  # another model's, encrypted: nothing to render
        message: dict = {"role": m.role, "content": "\n".join(texts)}
        if m.role == "assistant":
            if thinking:
                message["reasoning_content"] = "".join(thinking)
            if calls:
                message["tool_calls"] = call_message(calls, as_dict)
        elif not texts and out and out[-1]["role"] == "tool":
            continue  # a turn of tool results only
        out.append(message)
    return out


def _tools(req: Conversation) -> list[dict] | None:
    tools = []
    for i, t in enumerate(req.tools or []):
        if t.type not in (None, "custom"):
            why = "Anthropic's server tools are not available here"
            raise APIError(400, f"tools[{i}]: {t.type!r}: {why}", f"tools[{i}].type")
        if t.input_schema is None:
            raise APIError(400, f"tools[{i}].input_schema: required", f"tools[{i}].input_schema")
        tools.append(function_tool(t.name, t.description, t.input_schema))
    return tools or None


def _choice(req: Conversation) -> tuple[str, str | None]:
    choice = req.tool_choice
    if choice is None:
        return "auto", None
    if choice.type == "tool" and not choice.name:
        raise APIError(
            400, "tool_choice: a choice of type tool needs the tool's name", "tool_choice"
        )
    kind = {"auto": "auto", "none": "none", "any": "required", "tool": "required"}[choice.type]
    return kind, choice.name if choice.type == "tool" else None


def _template(req: Conversation) -> dict:
    """The chat template's own thinking switches (V3.1's `thinking`, Qwen3's `enable_thinking`)."""
    if req.thinking is None or req.thinking.type not in ("enabled", "disabled"):
        return {}
    on = req.thinking.type == "enabled"
    return {"thinking": on, "enable_thinking": on}


def _format_grammar(req: MessagesRequest, think_end: int | None, harmony: bool) -> str | None:
    config = req.output_config or {}
    fmt, param = config.get("format"), "output_config.format"
    if fmt is None and req.output_format is not None:
        fmt, param = req.output_format, "output_format"
    try:
        return anthropic_format_grammar(fmt, param, think_end, harmony)
    except GrammarError as e:
        raise refused(e, param) from None


def _check_model(ctx: Context, model: str) -> None:
    if model not in ("", ctx.model_name):
        why = f"this server serves {ctx.model_name!r}"
        raise APIError(404, f"model: {model!r} does not exist: {why}", "model")


def conversation_turn(
    ctx: Context,
    req: Conversation,
    grammar: Callable[[int | None, bool], str | None] | None = None,
) -> Turn:
    _check_model(ctx, req.model)
    choice, name = _choice(req)
    messages = chat_messages(req, template_takes_dicts(ctx))
    off = req.thinking is not None and req.thinking.type == "disabled"
    tools = _tools(req)
    prefill = None
    last = messages[-1]
    if last["role"] == "assistant" and isinstance(last.get("content"), str) and len(messages) > 1:
        if not last.get("tool_calls") and not last.get("reasoning_content"):
            prefill = messages.pop()["content"].rstrip()  # Anthropic's rule: no trailing space
    template = _template(req)
    return prepare(
        ctx, messages, tools, choice, name, grammar, "messages", off, prefill, **template
    )


def usage(done: Done) -> dict:
    return {
        "input_tokens": done.prompt_tokens - done.cached_tokens,
        "output_tokens": done.completion_tokens,
        "cache_read_input_tokens": done.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


class Reply:
    """One request's answer as Anthropic's message, whole or as stream events."""

    def __init__(self, ctx: Context, req: MessagesRequest, turn: Turn) -> None:
        self.ctx, self.req, self.turn = ctx, req, turn
        self.id = "msg_" + uuid.uuid4().hex[:24]
        self.answer = turn.answer()
        self.blocks = Blocks(show_thinking=req.thinking is None or req.thinking.shown())

    def head(self) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.ctx.model_name}

    def token(self, token: Token) -> list[dict]:
        return self.blocks.add(self.answer.token(token.text))

    def end(self, done: Done) -> tuple[list[dict], dict]:
        """The last events, and the stop fields and usage."""
        events = self.blocks.add(self.answer.finish(done.text)) + self.blocks.close()
        stop = stop_sequence(self.ctx, done, self.req.stop_sequences or [])
        if self.answer.calls:
            reason = "tool_use"
        elif done.finish_reason == "length":
            reason = "max_tokens"
        else:
            reason = "stop_sequence" if stop is not None else "end_turn"
        return events, {"stop_reason": reason, "stop_sequence": stop, "usage": usage(done)}

    def whole(self, done: Done) -> dict:
        _, tail = self.end(done)
        return self.head() | {"content": self.blocks.content} | tail

    def start_event(self) -> dict:
        empty = {"content": [], "stop_reason": None, "stop_sequence": None}
        first = {"input_tokens": len(self.turn.prompt), "output_tokens": 0}
        return {"type": "message_start", "message": self.head() | empty | {"usage": first}}


async def _stream(ctx: Context, job: Job, reply: Reply) -> AsyncIterator[str]:
    async with aclosing(ctx.events(job)) as events:
        yield sse(reply.start_event())
        yield sse({"type": "ping"})
        try:
            async for event in events:
                match event:
                    case Token() as token:
                        for e in reply.token(token):
                            yield sse(e)
                    case Done() as done:
                        last, tail = reply.end(done)
                        for e in last:
                            yield sse(e)
                        delta = {"stop_reason": tail["stop_reason"]}
                        delta["stop_sequence"] = tail["stop_sequence"]
                        yield sse({"type": "message_delta", "delta": delta, "usage": tail["usage"]})
                        yield sse({"type": "message_stop"})
        except APIError as e:  # a failure once the answer has begun: an error event
            yield sse(error_body(e.status, e.message))


def make_job(ctx: Context, req: MessagesRequest) -> tuple[Job, Turn]:
    turn = conversation_turn(ctx, req, functools.partial(_format_grammar, req))
    turn.single_call = req.tool_choice is not None and req.tool_choice.disable_parallel_tool_use
    params = Params(
        model=req.model,
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop_sequences or [],
        extras=make_extras(
            bias=turn.ban, grammar=turn.grammar, think_budget=_budget(ctx, req, turn)
        ),
    )
    return ctx.make_job(params, turn.prompt, "messages"), turn


def _budget(ctx: Context, req: MessagesRequest, turn: Turn) -> tuple[int, int] | None:
    """thinking.budget_tokens, enforced on the sampling rank when the answer begins inside a
    think block that a </think> token ends (R1): after that many tokens, the block closes."""
    thinking = req.thinking
    if thinking is None or thinking.type != "enabled" or thinking.budget_tokens is None:
        return None
    end = ctx.vocab_map.get(CLOSE)
    return (thinking.budget_tokens, end) if turn.think == "think" and end is not None else None


def add_routes(app: FastAPI, ctx: Context) -> None:
    @app.post("/v1/messages")
    async def messages(request: Request):
        try:
            req = await read_request(request, MessagesRequest)
            job, turn = make_job(ctx, req)
            reply = Reply(ctx, req, turn)
            ctx.submit(job)
            if req.stream:
                headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
                stream = _stream(ctx, job, reply)
                return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
            async with aclosing(ctx.events(job, request)) as events:
                async for event in events:
                    match event:
                        case Token() as token:
                            reply.token(token)
                        case Done() as done:
                            return JSONResponse(reply.whole(done))
        except APIError as e:
            return error_response(e)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        try:
            req = await read_request(request, Conversation)
            return {"input_tokens": len(conversation_turn(ctx, req).prompt)}
        except APIError as e:
            return error_response(e)
