"""OpenAI's way to answer a chat or completion job: whole, or streamed as server-sent events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from mlxdist.serving.api.context import Context
from mlxdist.serving.api.errors import APIError, error_body
from mlxdist.serving.api.openai_output import Output, sse
from mlxdist.serving.events import Done, Token
from mlxdist.serving.job import Job


async def respond(ctx: Context, job: Job, out: Output, request: Request):
    """Submits the job and answers it in out's shape."""
    ctx.submit(job)
    if out.req.stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            _stream(ctx, job, out), media_type="text/event-stream", headers=headers
        )
    async with aclosing(ctx.events(job, request)) as events:
        async for event in events:
            match event:
                case Token() as token:
                    out.token(token)
                case Done() as done:
                    return JSONResponse(out.whole(done))


async def _stream(ctx: Context, job: Job, out: Output) -> AsyncIterator[str]:
    with_ids = out.req.return_token_ids
    async with aclosing(ctx.events(job)) as events:
        if out.chat:
            yield out.chunk({"role": "assistant", "content": ""})
        try:
            async for event in events:
                match event:
                    case Token() as token:
                        piece = out.token(token)
                        for chunk in out.deltas(piece, [token.id] if with_ids else None):
                            yield chunk
                    case Done() as done:
                        for chunk in out.deltas(out.tail(done)):
                            yield chunk
                        yield out.chunk(reason=out.finish_reason(done))
                        if out.req.include_usage():
                            yield out.usage_chunk(done)
        except APIError as e:  # a failure once the answer has begun: an error event
            yield sse(error_body(e.message, e.kind, code=e.code))
        yield "data: [DONE]\n\n"
