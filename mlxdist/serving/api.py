"""The coordinator's HTTP API: OpenAI-style completions, streamed as server-sent events or not.

Requests wait in the coordinator's first-come first-served queue; a client that goes away
(mid-stream or while waiting) cancels its job, so every rank moves on to the next one. When a node
fails, every request in flight ends with an error that names it, and new ones are refused.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mlxdist.serving.coordinator import Coordinator
from mlxdist.serving.events import Done, Event, Failed, Gone, Token
from mlxdist.serving.guard import Guard, Policy
from mlxdist.serving.job import Job
from mlxdist.serving.openai_schema import (
    APIError,
    ChatRequest,
    CompletionRequest,
    LogitsRequest,
    Sampling,
    error_body,
    error_response,
    validation_error,
)
from mlxdist.serving.reasoning import reasoning_start
from mlxdist.serving.responses import Output, finish_reason, sse

MAX_STOPS = 16
EXPLAIN_WAIT = 2.0  # how long a ring error waits for the heartbeat to name the node behind it


class Inflight:
    """The jobs the API has submitted and not yet answered; all failed at once when a node fails."""

    def __init__(self) -> None:
        self.jobs: dict[int, Job] = {}  # by id(): a Job (a dataclass) has no hash
        self.failure: str | None = None
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        with self._lock:
            if self.failure is None:
                self.jobs[id(job)] = job
                return
        raise APIError(503, self.failure, code="node_failed", kind="server_error")

    def remove(self, job: Job) -> None:
        with self._lock:
            self.jobs.pop(id(job), None)

    def fail(self, message: str) -> None:
        """Ends every job in flight with an error naming the failed node (from any thread)."""
        with self._lock:
            self.failure = message
            jobs = list(self.jobs.values())
        for job in jobs:
            job.cancelled.set()
            job.emit(Failed(message))

    def wait_idle(self, timeout: float) -> bool:
        """True once every job in flight has been answered (its error sent), within timeout."""
        deadline = time.monotonic() + timeout
        while self.jobs and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.jobs

    async def explain(self, message: str, wait: float) -> tuple[str, str | None]:
        """A ring error's message, or the failed node's once the heartbeat names it."""
        deadline = time.monotonic() + wait
        while self.failure is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.failure is not None:
            return self.failure, "node_failed"
        return message, None


def create_app(
    coordinator: Coordinator,
    model_name: str,
    info: dict,
    inflight: Inflight | None = None,
    policy: Policy | None = None,
) -> FastAPI:
    """policy: the Host, key, body and CORS guards (mlxdist/serving/guard.py); None, in
    in-process tests only: no guard."""
    docs = policy is None or policy.docs
    app = FastAPI(
        title="mlxdist",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    if policy is not None:
        app.add_middleware(Guard, policy=policy)
    # Without heartbeats (one rank), an error has no node failure to wait for.
    inflight, wait = (inflight, EXPLAIN_WAIT) if inflight else (Inflight(), 0.0)
    app.state.inflight = inflight
    tokenizer = coordinator.tokenizer
    vocab = info["vocab_size"]
    context = info.get("context")

    @app.exception_handler(APIError)
    async def refused(_: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(e.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        code = {404: "not_found", 413: "body_too_large"}.get(e.status_code)
        return error_response(APIError(e.status_code, str(e.detail), code=code))

    def check_ids(ids: list[int], param: str = "prompt") -> list[int]:
        # MLX does not bounds-check embedding lookups: an id past the vocabulary crashes a rank.
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(
                400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param
            )
        if not ids:
            raise APIError(400, "the prompt has no tokens", param)
        if context is not None and len(ids) >= context:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens but the model's context is {context} tokens "
                "(prompt and answer together)",
                param,
                "context_length_exceeded",
            )
        return ids

    def utf8(text: str, param: str) -> str:
        # JSON's "\ud800" escapes decode to lone surrogates, which the tokenizer cannot encode.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{param}: the text holds a lone surrogate", param) from None
        return text

    def make_job(req: Sampling, prompt: list[int], param: str = "prompt") -> Job:
        if req.model not in (None, "", model_name):
            raise APIError(
                404,
                f"the model {req.model!r} does not exist: this server serves {model_name!r}",
                "model",
                "model_not_found",
            )
        if len(req.stops()) > MAX_STOPS:
            raise APIError(400, f"stop: at most {MAX_STOPS} sequences", "stop")
        prompt = check_ids(prompt, param)
        room = context - len(prompt) if context is not None else None
        limit = req.limit()
        if limit is None:
            limit = room if room is not None else 4096
        elif room is not None:
            limit = min(limit, room)  # the answer ends at the context's end ("length")
        if req.speculative == "mtp" and not coordinator.has_mtp():
            why = "this server drafts with no MTP layer: start it with --speculative mtp"
            raise APIError(400, f"speculative: {why}", "speculative")
        return Job(
            prompt=prompt,
            max_tokens=limit,
            temp=req.temperature,
            top_p=req.top_p,
            seed=-1 if req.seed is None else req.seed,
            stop=req.stops(),
            ignore_eos=req.ignore_eos,
            speculative=req.speculative,
            draft_tokens=req.draft_tokens,
            loop=asyncio.get_running_loop(),
        )

    @app.get("/health")
    def health(request: Request) -> dict:
        # Open to all; the cluster's make-up (hosts, memory, model) only to a key's holder.
        if policy is not None and not policy.authorized(request.headers.get("authorization")):
            return {"status": "ok"}
        return {"status": "ok", "model": model_name, "queued": coordinator.pending(), **info}

    @app.get("/v1/models")
    def models() -> dict:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "mlxdist"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in req.messages
        ]
        try:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # the template's own checks (role order, a missing template)
            raise APIError(400, f"the chat template refused the messages: {e}", "messages") from e
        prompt = tokenizer.encode(utf8(text, "messages"), add_special_tokens=False)
        # None: no splitting; else how the output begins (answer, think block, harmony header)
        think = reasoning_start(text) if req.reasoning_format == "deepseek" else None
        job = make_job(req, prompt, "messages")
        return await respond(req, job, request, chat=True, think=think)

    @app.post("/v1/completions")
    async def complete(req: CompletionRequest, request: Request):
        prompt = req.prompt
        if isinstance(prompt, str):
            prompt = tokenizer.encode(utf8(prompt, "prompt"))
        return await respond(req, make_job(req, prompt), request, chat=False)

    @app.post("/mlxdist/logits")
    async def logits(req: LogitsRequest):
        job = Job(prompt=check_ids(req.prompt), max_tokens=0, logits=True)
        job.loop = asyncio.get_running_loop()
        event = await one_event(job)
        return {"logits": event.values}

    @app.get("/mlxdist/stats")
    async def stats():
        """Bytes each rank has sent (hidden states and token ids apart from control), steps,
        peak memory, and the most steps the ring has held at once."""
        job = Job(prompt=[], max_tokens=0, stats=True, loop=asyncio.get_running_loop())
        coordinator.submit(job)
        event = await job.events.get()
        if isinstance(event, Failed):
            raise APIError(500, event.message, kind="server_error")
        out = {"ranks": event.ranks, "in_flight_peak": event.in_flight_peak}
        if event.prefix_cache is not None:
            out["prefix_cache"] = event.prefix_cache
        if event.speculative is not None:
            out["speculative"] = event.speculative
        return out

    async def failed(event: Failed) -> APIError:
        message, code = await inflight.explain(event.message, wait)
        return APIError(503 if code else 500, message, code=code, kind="server_error")

    async def one_event(job: Job) -> Event:
        inflight.add(job)
        try:
            coordinator.submit(job)
            event = await job.events.get()
            if isinstance(event, Failed):
                raise await failed(event)
            return event
        finally:
            inflight.remove(job)

    async def respond(req: Sampling, job: Job, request: Request, chat: bool, think=None):
        inflight.add(job)
        coordinator.submit(job)
        out = Output(req, model_name, chat, think)
        if req.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(
                _stream(job, out, inflight, wait), media_type="text/event-stream", headers=headers
            )
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            while True:
                match await job.events.get():
                    case Gone():
                        return JSONResponse({}, status_code=499)  # no one is there to read it
                    case Failed() as failure:
                        raise await failed(failure)
                    case Token() as token:
                        out.token(token)
                    case Done() as done:
                        return JSONResponse(out.whole(done))
        finally:
            watcher.cancel()
            job.cancelled.set()  # done already, or the client is gone
            inflight.remove(job)

    return app


async def _watch_disconnect(request: Request, job: Job) -> None:
    """A client that goes away while its whole answer is made cancels it, even in the queue."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()
    job.events.put_nowait(Gone())


async def _stream(job: Job, out: Output, inflight: Inflight, wait: float) -> AsyncIterator[str]:
    with_ids = out.req.return_token_ids
    try:
        if out.chat:
            yield out.chunk({"role": "assistant", "content": ""})
        while True:
            match await job.events.get():
                case Failed(message=message):
                    message, code = await inflight.explain(message, wait)
                    yield sse(error_body(message, "server_error", code=code))
                    break
                case Token() as token:
                    r, c = out.token(token)
                    for piece in out.deltas(r, c, [token.id] if with_ids else None):
                        yield piece
                case Done() as done:
                    for piece in out.deltas(*out.tail(done)):
                        yield piece
                    yield out.chunk(reason=finish_reason(done.finish_reason))
                    if out.req.include_usage():
                        yield out.usage_chunk(done)
                    break
        yield "data: [DONE]\n\n"
    finally:
        # A client that went away mid-stream stops the generation at the next token.
        job.cancelled.set()
        inflight.remove(job)
