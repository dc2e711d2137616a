"""POST /v1/completions: OpenAI's completions of a prompt (text or token ids), whole or streamed."""

from __future__ import annotations

from fastapi import FastAPI, Request

from mlxdist.serving.answer import Answer
from mlxdist.serving.api.context import Context
from mlxdist.serving.api.openai_chat import format_grammar, params
from mlxdist.serving.api.openai_output import Output
from mlxdist.serving.api.openai_schema import CompletionRequest
from mlxdist.serving.api.openai_stream import respond


def add_routes(app: FastAPI, ctx: Context) -> None:
    @app.post("/v1/completions")
    async def complete(req: CompletionRequest, request: Request):
        prompt = req.prompt
        if isinstance(prompt, str):
            prompt = ctx.encode(prompt)
        job = ctx.make_job(params(ctx, req, req.logprobs, format_grammar(req)), prompt)
        token_bytes = ctx.token_bytes if req.logprobs is not None else None
        out = Output(req, ctx.model_name, False, Answer(), token_bytes)
        return await respond(ctx, job, out, request)
