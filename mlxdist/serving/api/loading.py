"""Rank 0's HTTP server while the ranks load: the dashboard (each rank's load progress) under the
same guards, every other route a 503 that says the model is loading; then the API itself, on the
same socket, the same board, the pages kept."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mlxdist.serving.api.errors import error_body
from mlxdist.serving.dashboard import Board, add_dashboard
from mlxdist.serving.guard import Guard, Policy

LOADING = "the model is still loading on the cluster's ranks: try again when it has loaded"


class Switch:
    """An ASGI app that hands each request to the app of the moment: the loading one, then the
    API once every rank has loaded."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)


def loading_app(board: Board, policy: Policy | None) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    if policy is not None:

        def told(status: int, method: str, path: str, why: str) -> None:
            board.refused(f"{status} {method} {path}: {why}")

        app.add_middleware(Guard, policy=policy, told=told)
    add_dashboard(app, board)

    @app.get("/health")
    def health() -> JSONResponse:  # not ready: a launcher waiting for 200 goes on waiting
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE"], include_in_schema=False)
    def loading(request: Request) -> JSONResponse:
        body = error_body(LOADING, "server_error", None, "loading")
        return JSONResponse(body, status_code=503, headers={"retry-after": "5"})

    return app
