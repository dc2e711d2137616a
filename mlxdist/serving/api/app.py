"""The coordinator's HTTP API: the app, its error handlers and the routes every API shares.

Requests wait in the coordinator's first-come first-served queue; a client that goes away
(mid-stream or while waiting) cancels its job, so every rank moves on to the next one. When a node
fails, every request in flight ends with an error that names it, and new ones are refused.
Each API's routes live in a module of their own (openai_chat.py, completions.py), on the shared
machinery of context.py.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from mlxdist.serving.api import anthropic, completions, openai_chat, responses_api
from mlxdist.serving.api.context import ClientGone, Context, Inflight
from mlxdist.serving.api.errors import APIError, error_response, validation_error
from mlxdist.serving.api.openai_schema import LogitsRequest
from mlxdist.serving.coordinator import Coordinator
from mlxdist.serving.dashboard import Board, add_dashboard
from mlxdist.serving.dashboard.cluster import ClusterSample, cluster_static
from mlxdist.serving.events import Failed
from mlxdist.serving.guard import Guard, Policy
from mlxdist.serving.job import Job


def create_app(
    coordinator: Coordinator,
    model_name: str,
    info: dict,
    inflight: Inflight | None = None,
    policy: Policy | None = None,
    view: dict | None = None,
    ages=None,
    board: Board | None = None,
) -> FastAPI:
    """policy: the Host, key, body and CORS guards (mlxdist/serving/guard.py); None, in
    in-process tests only: no guard. view: the launcher's view of the cluster (chips, memory,
    cables, the predicted speed) for the dashboard; ages() -> each rank's heartbeat age; board:
    the dashboard's board while the ranks loaded (its pages stay), else a new one."""
    docs = policy is None or policy.docs
    app = FastAPI(
        title="mlxdist",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    static = cluster_static(model_name, info, view)
    if board is None:
        board = Board("cluster", static)
    else:  # the pages watching the load see the cluster loaded, each rank's load kept
        loads = {n["name"]: n.get("load") for n in board.nodes()}
        for node in static["nodes"]:
            node["load"] = loads.get(node["name"])
        board.set_static(static)
    ctx = Context(coordinator, model_name, info, inflight, board)
    names = [n["name"] for n in static["nodes"]]
    board.sample = ClusterSample(coordinator, ctx.inflight, names, lambda: board.tokens, ages)
    app.state.inflight = ctx.inflight
    app.state.context = ctx
    app.state.board = board
    if policy is not None:

        def guarded(status: int, method: str, path: str, why: str) -> None:
            board.refused(f"{status} {method} {path}: {why}")

        app.add_middleware(Guard, policy=policy, told=guarded)

    def told(request: Request, e: APIError) -> None:  # the dashboard's events
        board.refused(f"{e.status} {request.method} {request.url.path}: {e.message}")

    @app.exception_handler(APIError)
    async def refused(request: Request, e: APIError) -> JSONResponse:
        told(request, e)
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        error = validation_error(list(e.errors()))
        told(request, error)
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        code = {404: "not_found", 413: "body_too_large"}.get(e.status_code)
        refused = APIError(e.status_code, str(e.detail), code=code)
        told(request, refused)
        if request.url.path.startswith("/v1/messages"):  # a 405, a 413: Anthropic's shape there
            return anthropic.error_response(refused)
        return error_response(refused)

    @app.exception_handler(ClientGone)
    async def gone(_: Request, e: ClientGone) -> JSONResponse:
        return JSONResponse({}, status_code=499)  # no one is there to read it

    @app.get("/health")
    def health(request: Request) -> dict:
        # Open to all; the cluster's make-up (hosts, memory, model) only to a key's holder.
        headers = request.headers
        if policy is not None and not policy.authorized(
            headers.get("authorization"), headers.get("x-api-key")
        ):
            return {"status": "ok"}
        return {"status": "ok", "model": model_name, "queued": coordinator.pending(), **info}

    @app.get("/v1/models")
    def models() -> dict:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "mlxdist"}
        return {"object": "list", "data": [card]}

    add_dashboard(app, board)
    openai_chat.add_routes(app, ctx)
    completions.add_routes(app, ctx)
    anthropic.add_routes(app, ctx)
    responses_api.add_routes(app, ctx)

    @app.post("/mlxdist/logits")
    async def logits(req: LogitsRequest):
        job = Job(prompt=ctx.check_ids(req.prompt), max_tokens=0, logits=True)
        job.loop = asyncio.get_running_loop()
        event = await ctx.one_event(job)
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

    return app
