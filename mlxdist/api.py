"""The coordinator's HTTP API: OpenAI-style completions with server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from .coordinator import Coordinator, Job


class Message(BaseModel):
    role: str
    content: str


class _Sampling(BaseModel):
    model: str | None = None
    max_tokens: int = Field(256, ge=0)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stream: bool = False
    return_token_ids: bool = False  # mlxdist extension: the generated ids in each choice


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[int]


class LogitsRequest(BaseModel):
    prompt: list[int] = Field(min_length=1)


def create_app(coordinator: Coordinator, model_name: str, info: dict) -> FastAPI:
    app = FastAPI(title="mlxdist")
    tokenizer = coordinator.tokenizer
    vocab = info["vocab_size"]

    def check_ids(ids: list[int]) -> list[int]:
        # MLX does not bounds-check embedding lookups: an id past the vocabulary crashes a rank.
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise HTTPException(
                400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})"
            )
        if not ids:
            raise HTTPException(400, "the prompt has no tokens")
        return ids

    def make_job(req: _Sampling, prompt: list[int]) -> Job:
        return Job(
            prompt=check_ids(prompt),
            max_tokens=req.max_tokens,
            temp=req.temperature,
            top_p=req.top_p,
            seed=-1 if req.seed is None else req.seed,
            loop=asyncio.get_running_loop(),
        )

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_name, **info}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        messages = [m.model_dump() for m in req.messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer.encode(text, add_special_tokens=False)
        return await respond(req, make_job(req, prompt), chat=True)

    @app.post("/v1/completions")
    async def complete(req: CompletionRequest):
        prompt = req.prompt if isinstance(req.prompt, list) else tokenizer.encode(req.prompt)
        return await respond(req, make_job(req, prompt), chat=False)

    @app.post("/mlxdist/logits")
    async def logits(req: LogitsRequest):
        job = Job(prompt=check_ids(req.prompt), max_tokens=0, logits=True)
        job.loop = asyncio.get_running_loop()
        coordinator.submit(job)
        kind, data = await job.events.get()
        if kind == "error":
            raise HTTPException(500, data["message"])
        return {"logits": data["values"]}

    async def respond(req: _Sampling, job: Job, chat: bool):
        coordinator.submit(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if req.stream:
            events = _stream(job, rid, created, model_name, chat, req.return_token_ids)
            return StreamingResponse(events, media_type="text/event-stream")
        text, ids = [], []
        while True:
            ev, data = await job.events.get()
            if ev == "error":
                raise HTTPException(500, data["message"])
            if ev == "token":
                text.append(data["text"])
                ids.append(data["id"])
            if ev == "done":
                break
        text.append(data["text"])
        content = "".join(text)
        choice = {"index": 0, "finish_reason": _finish(data["finish_reason"])}
        if chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        if req.return_token_ids:
            choice["token_ids"] = ids
        body = {"id": rid, "object": kind, "created": created, "model": model_name}
        body |= {"choices": [choice], "usage": _usage(data)}
        return JSONResponse(body)

    return app


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(data: dict) -> dict:
    return {
        "prompt_tokens": data["prompt_tokens"],
        "completion_tokens": data["completion_tokens"],
        "total_tokens": data["prompt_tokens"] + data["completion_tokens"],
        "time_to_first_token": data["time_to_first_token"],
        "decode_tokens_per_second": data["decode_tokens_per_second"],
    }


async def _stream(
    job: Job, rid: str, created: int, model: str, chat: bool, with_ids: bool
) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, reason: str | None, **extra) -> str:
        choice: dict = {"index": 0, "finish_reason": reason}
        if chat:
            choice["delta"] = {} if text is None else {"content": text}
        else:
            choice["text"] = text or ""
        choice |= extra
        body = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    try:
        if chat:
            yield _role_chunk(rid, created, model)
        while True:
            ev, data = await job.events.get()
            if ev == "error":
                yield f"data: {json.dumps({'error': {'message': data['message']}})}\n\n"
                break
            if ev == "token":
                extra = {"token_ids": [data["id"]]} if with_ids else {}
                if data["text"] or with_ids:
                    yield chunk(data["text"], None, **extra)
            elif ev == "done":
                if data["text"]:
                    yield chunk(data["text"], None)
                body = json.loads(chunk(None, _finish(data["finish_reason"]))[6:])
                body["usage"] = _usage(data)
                yield f"data: {json.dumps(body)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        # A client that went away mid-stream stops the generation at the next token.
        job.cancelled.set()


def _role_chunk(rid: str, created: int, model: str) -> str:
    choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    body["choices"] = [choice]
    return f"data: {json.dumps(body)}\n\n"
