"""POST /v1/responses: OpenAI's Responses API, whole or streamed; GET and DELETE
/v1/responses/{id}.

`input` (text, or items: responses_items.py) after `instructions` goes through the model's chat
template; the output is a `reasoning` item (the model's reasoning as `reasoning_text`), a
`message` with `output_text`, and `function_call` items, in the order the model wrote them.
`tools` are function tools (OpenAI's hosted tools are refused); `tool_choice` auto, none,
required or a named function (forced by a grammar, as chat's: turn.py); `text.format` holds the
answer to a JSON schema. Responses are kept in memory (responses_store.py) unless `store` is
false: `previous_response_id` continues one (its instructions are not carried over, as OpenAI
does), an unknown id is a 404. Errors come in OpenAI's shape (the app's handlers).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from mlxdist.serving.api.chat_render import effort_switches
from mlxdist.serving.api.context import Context, Params
from mlxdist.serving.api.errors import APIError
from mlxdist.serving.api.responses_items import chat_messages
from mlxdist.serving.api.responses_schema import NamedChoice, ResponsesRequest
from mlxdist.serving.api.responses_store import MAX_RESPONSES, ResponseStore
from mlxdist.serving.api.responses_stream import Items, new_id
from mlxdist.serving.api.sampling import make_extras, refused
from mlxdist.serving.api.turn import Turn, function_tool, prepare, template_takes_dicts
from mlxdist.serving.events import Done, Token
from mlxdist.serving.grammar import GrammarError, responses_format_grammar
from mlxdist.serving.job import Job


def _tools(req: ResponsesRequest) -> list[dict] | None:
    tools = []
    for i, t in enumerate(req.tools or []):
        if t.type != "function":
            why = "only function tools are available here"
            raise APIError(400, f"tools[{i}]: a tool of type {t.type!r}: {why}", f"tools[{i}].type")
        if t.name is None:
            raise APIError(400, f"tools[{i}].name: required", f"tools[{i}].name")
        tools.append(function_tool(t.name, t.description, t.parameters))
    return tools or None


def _choice(req: ResponsesRequest) -> tuple[str, str | None]:
    choice = req.tool_choice
    if isinstance(choice, NamedChoice):
        return "required", choice.name
    return choice or "auto", None


def _format_grammar(req: ResponsesRequest, think_end: int | None, harmony: bool) -> str | None:
    try:
        fmt = req.text.format if req.text else None
        return responses_format_grammar(fmt, think_end, harmony)
    except GrammarError as e:
        raise refused(e, "text.format") from None


def _input_items(req: ResponsesRequest) -> list[dict]:
    if isinstance(req.input, str):
        return [{"type": "message", "role": "user", "content": req.input}]
    return req.input


class Reply:
    """One request's response object, its output items and, streamed, its events."""

    def __init__(self, ctx: Context, req: ResponsesRequest, turn: Turn, items: list[dict]):
        self.ctx, self.req, self.turn = ctx, req, turn
        self.conversation = items  # what the store keeps, before the output
        self.id = new_id("resp")
        self.created = int(time.time())
        self.answer = turn.answer()
        self.items = Items()
        self.sequence = 0

    def body(self, status: str, done: Done | None = None) -> dict:
        req = self.req
        choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedChoice) else None
        text_format = (req.text.format if req.text else None) or {"type": "text"}
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.ctx.model_name,
            "output": self.items.output if done is not None else [],
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {
                "effort": req.reasoning.effort if req.reasoning else None,
                "summary": None,
            },
            "store": req.store,
            "temperature": req.temperature,
            "text": {"format": text_format},
            "tool_choice": choice or req.tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "top_p": req.top_p,
            "truncation": "disabled",
            "usage": self.usage(done) if done is not None else None,
            "user": None,
            "metadata": req.metadata or {},
        }

    def usage(self, done: Done) -> dict:
        return {
            "input_tokens": done.prompt_tokens,
            "input_tokens_details": {"cached_tokens": done.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": done.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": self.answer.reasoning_tokens},
            "total_tokens": done.prompt_tokens + done.completion_tokens,
        }

    def token(self, token: Token) -> list[dict]:
        return self.items.add(self.answer.token(token.text))

    def end(self, done: Done, store: ResponseStore) -> tuple[list[dict], dict]:
        """The last events and the finished response (kept in the store when asked)."""
        events = self.items.add(self.answer.finish(done.text)) + self.items.close()
        truncated = done.finish_reason == "length" and not self.answer.calls
        body = self.body("incomplete" if truncated else "completed", done)
        if self.req.store:
            store.put(self.id, self.conversation + self.items.output, body)
        return events, body

    def sse(self, event: dict) -> str:
        event = event | {"sequence_number": self.sequence}
        self.sequence += 1
        return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


async def _stream(ctx: Context, job: Job, reply: Reply, store: ResponseStore) -> AsyncIterator[str]:
    async with aclosing(ctx.events(job)) as events:
        yield reply.sse({"type": "response.created", "response": reply.body("in_progress")})
        yield reply.sse({"type": "response.in_progress", "response": reply.body("in_progress")})
        try:
            async for event in events:
                match event:
                    case Token() as token:
                        for e in reply.token(token):
                            yield reply.sse(e)
                    case Done() as done:
                        last, body = reply.end(done, store)
                        for e in last:
                            yield reply.sse(e)
                        # "completed" even when the body says "incomplete": the openai
                        # client's responses.stream() ends only on response.completed
                        yield reply.sse({"type": "response.completed", "response": body})
        except APIError as e:  # a failure once the answer has begun: an error event
            yield reply.sse(
                {"type": "error", "code": e.code, "message": e.message, "param": e.param}
            )


def make_job(ctx: Context, req: ResponsesRequest, store: ResponseStore) -> tuple[Job, Reply]:
    as_dict = template_takes_dicts(ctx)
    history: list[dict] = []
    if (req.model_extra or {}).get("conversation") is not None:
        why = "conversations are not kept here: continue one with previous_response_id"
        raise APIError(400, f"conversation: {why}", "conversation")
    if req.previous_response_id is not None:
        stored = store.get(req.previous_response_id)
        if stored is None:
            why = f"this server keeps its last {MAX_RESPONSES} responses in memory, till it stops"
            raise APIError(
                404,
                f"previous_response_id: no response {req.previous_response_id!r} ({why})",
                "previous_response_id",
                "previous_response_not_found",
            )
        history = stored.items
    new = _input_items(req)
    messages = chat_messages(history, as_dict, "previous_response_id") + chat_messages(new, as_dict)
    if req.instructions is not None:
        messages.insert(0, {"role": "system", "content": req.instructions})
    choice, name = _choice(req)
    effort = req.reasoning.effort if req.reasoning else None
    template = effort_switches(effort)
    grammar = functools.partial(_format_grammar, req)  # built once the prompt shows its start
    off = effort == "none"  # reasoning off: a think block the prompt opens is closed empty
    turn = prepare(ctx, messages, _tools(req), choice, name, grammar, "input", off, **template)
    turn.single_call = not req.parallel_tool_calls
    params = Params(
        model=req.model,
        max_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        extras=make_extras(bias=turn.ban, grammar=turn.grammar),
    )
    job = ctx.make_job(params, turn.prompt, "input")
    return job, Reply(ctx, req, turn, history + new)


def add_routes(app: FastAPI, ctx: Context) -> None:
    store = ResponseStore()
    app.state.responses = store

    @app.post("/v1/responses")
    async def create(req: ResponsesRequest, request: Request):
        job, reply = make_job(ctx, req, store)
        ctx.submit(job)
        if req.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            stream = _stream(ctx, job, reply, store)
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        async with aclosing(ctx.events(job, request)) as events:
            async for event in events:
                match event:
                    case Token() as token:
                        reply.token(token)
                    case Done() as done:
                        return reply.end(done, store)[1]

    @app.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str):
        stored = store.get(response_id)
        if stored is None:
            raise APIError(404, f"no response {response_id!r}", "response_id", "not_found")
        return stored.body

    @app.delete("/v1/responses/{response_id}")
    async def delete(response_id: str):
        if not store.delete(response_id):
            raise APIError(404, f"no response {response_id!r}", "response_id", "not_found")
        return {"id": response_id, "object": "response", "deleted": True}
