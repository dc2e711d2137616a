"""POST /v1/chat/completions: OpenAI's chat, whole or streamed."""

from __future__ import annotations

from fastapi import FastAPI, Request

from mlxdist.serving.api.context import Context, Params
from mlxdist.serving.api.openai_output import Output
from mlxdist.serving.api.openai_schema import ChatRequest, Sampling
from mlxdist.serving.api.openai_stream import respond
from mlxdist.serving.reasoning import reasoning_start


def params(req: Sampling) -> Params:
    """The generation an OpenAI chat or completion request asks for."""
    return Params(
        model=req.model,
        max_tokens=req.limit(),
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=req.stops(),
        ignore_eos=req.ignore_eos,
        speculative=req.speculative,
        draft_tokens=req.draft_tokens,
    )


def add_routes(app: FastAPI, ctx: Context) -> None:
    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in req.messages
        ]
        text = ctx.render_chat(messages)
        prompt = ctx.encode(text, "messages", special=False)
        # None: no splitting; else how the output begins (answer, think block, harmony header)
        think = reasoning_start(text) if req.reasoning_format == "deepseek" else None
        job = ctx.make_job(params(req), prompt, "messages")
        return await respond(ctx, job, Output(req, ctx.model_name, True, think), request)
