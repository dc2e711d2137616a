"""The dashboard's routes: the page and its files (open, so that the page can ask for the key),
and the cluster's state and live feed (behind the key, as every other route)."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from mlxdist.serving.dashboard.board import Board, TooManyPages

ASSETS = Path(__file__).parent / "assets"
ASSET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(js|css|svg|html)$")
TYPES = {
    "js": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "svg": "image/svg+xml",
    "html": "text/html; charset=utf-8",
}
# Nothing the page loads or sends leaves this origin, and no other site may frame it.
POLICY = (
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
PAGE_HEADERS = {
    "content-security-policy": POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",  # the files change with mlxdist; asked again, cheap on loopback
}
DATA_HEADERS = {"cache-control": "no-store", "x-content-type-options": "nosniff"}


def _asset(name: str) -> FileResponse | JSONResponse:
    path = ASSETS / name
    if not ASSET_NAME.match(name) or not path.is_file():
        body = {"error": {"message": f"no file /ui/{name}", "type": "invalid_request_error"}}
        return JSONResponse(body, status_code=404)
    kind = name.rsplit(".", 1)[1]
    return FileResponse(path, media_type=TYPES[kind], headers=PAGE_HEADERS)


def add_dashboard(app: FastAPI, board: Board) -> None:
    @app.get("/", include_in_schema=False)
    def page():
        return _asset("index.html")

    @app.get("/ui/{name}", include_in_schema=False)
    def asset(name: str):
        return _asset(name)

    @app.get("/mlxdist/state")
    def state() -> JSONResponse:
        """The cluster as the dashboard shows it: nodes, cables, plan, figures, events."""
        board.start()
        return JSONResponse(board.snapshot(), headers=DATA_HEADERS)

    @app.get("/mlxdist/live")
    async def live():
        """Server-sent events: `state` first, then a `tick` a second and each `event`."""
        feed = board.stream()
        try:
            first = await anext(feed)
        except TooManyPages as e:
            body = {"error": {"message": str(e), "type": "rate_limit_error"}}
            return JSONResponse(body, status_code=429)

        async def rest():
            yield first
            async for message in feed:
                yield message

        headers = DATA_HEADERS | {"x-accel-buffering": "no"}
        return StreamingResponse(rest(), media_type="text/event-stream", headers=headers)
