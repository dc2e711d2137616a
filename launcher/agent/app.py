"""The agent's app: its routes and error answers, and serving it on the given addresses."""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware

from ..auth import Verifier
from ..discovery import facts_digest
from ..diskfree import disk_facts
from ..hostfacts import load_node_id
from .errors import Refused
from .guard import KEEP_ALIVE, Guard, MarkVerified, guarded_protocol
from .hubfetch import Fetches, probe
from .ranks import MiB, Runs, model_folder, tail_lines
from .requests import CompleteFile, FetchFiles, ProbeHub, StartRank
from .signing import SignedOnly
from .uploads import Uploads, list_models


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ())[1:]) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Refused)
    async def refused(_: Request, exc: Refused) -> JSONResponse:
        return JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)


def _node_id_path(models_dir: Path) -> Path:
    return Path(models_dir).expanduser().resolve().parent / "node_id"


def create_agent_app(
    secret: bytes,
    models_dir: Path,
    facts: Callable[[], dict],
    *,
    python: str = sys.executable,
    runs_dir: Path | None = None,
    max_body: int = 64 * MiB,
    body_timeout: float = 120.0,
    window: float = 30.0,
    node_id: str | None = None,
) -> FastAPI:
    """The agent's app; every request must be signed with secret for node_id (by default the
    facts' node id) and this start of the app, and every answer is signed back."""
    # Without one in the facts, a node id kept beside the models dir (~/.mlxdist/node_id by
    # default): a new id each start would move its rank and shards after a restart.
    node_id = node_id or facts().get("node_id") or load_node_id(_node_id_path(models_dir))
    boot_id = secrets.token_hex(16)  # a new one each start: requests signed before it are void
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    root = models_dir.resolve()
    if runs_dir is None:
        runs_dir = Path(tempfile.mkdtemp(prefix="mlxdist-agent-"))
    runs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    runs = Runs(runs_dir, python)
    uploads = Uploads(root)
    fetches = Fetches(root)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await run_in_threadpool(runs.stop_all)

    # No redirects: "/ranks/" is an unknown path (404), not a 307 to somewhere else.
    app = FastAPI(
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,
    )
    app.state.runs = runs
    app.state.models_dir = root
    app.state.node_id = node_id
    app.state.boot_id = boot_id
    _error_handlers(app)
    verifier = Verifier(secret, window, node_id=node_id, boot_id=boot_id)
    app.add_middleware(
        SignedOnly, verifier=verifier, secret=secret, max_body=max_body, body_timeout=body_timeout
    )

    @app.get("/hello")
    def hello() -> dict:
        # The one route a request may sign for any agent ("*"): read-only, it is how a launcher
        # learns whom it talks to. time: lets `mlxdist doctor` measure the clock skew; max_body:
        # a client sends no body the agent would refuse mid-way (a reset, not an answer).
        digest = facts_digest(facts())
        return {
            "node_id": node_id,
            "boot_id": boot_id,
            "facts": digest,
            "time": time.time(),
            "max_body": max_body,
        }

    @app.get("/health")
    def health() -> dict:
        # time: lets `mlxdist doctor` measure the clock skew against the signing window.
        return {
            "ok": True,
            "ranks": sum(r.proc.poll() is None for r in runs.all()),
            "time": time.time(),
        }

    @app.get("/facts")
    def get_facts() -> dict:
        return {**facts(), **disk_facts(root)}  # free disk now, not when the agent started

    @app.get("/models")
    def models() -> dict:
        return {"models": list_models(root)}

    @app.post("/ranks")
    async def start_rank(req: StartRank) -> dict:
        # Started on the event loop's thread, which lives as long as the agent: PR_SET_PDEATHSIG
        # fires when the forking *thread* exits, and idle worker threads exit after seconds.
        folder = model_folder(root, req)
        run = runs.start(folder, req)
        return {"id": run.id, "pid": run.proc.pid}

    @app.get("/ranks")
    def list_ranks() -> list[dict]:
        return [run.info() for run in runs.all()]

    @app.get("/ranks/{run_id}/log")
    def rank_log(run_id: str, tail: int = Query(200, ge=1, le=10_000)) -> dict:
        run = runs.get(run_id)
        return {"id": run.id, "lines": tail_lines(run.log, tail)}

    @app.post("/ranks/stop-all")
    def stop_all() -> dict:
        return {"stopped": runs.stop_all()}

    @app.post("/ranks/{run_id}/stop")
    def stop_rank(run_id: str) -> dict:
        return runs.stop([runs.get(run_id)])[0]

    @app.get("/files/status")
    def file_status(path: str = Query(max_length=1024)) -> dict:
        return uploads.status(path)

    @app.put("/files/chunk")
    async def file_chunk(
        request: Request, path: str = Query(max_length=1024), offset: int = Query(ge=0)
    ) -> dict:
        data = await request.body()
        return await run_in_threadpool(uploads.write, path, offset, data)

    @app.post("/files/complete")
    def file_complete(req: CompleteFile) -> dict:
        return uploads.complete(req.path, req.size, req.sha256)

    @app.post("/fetch")
    def fetch_start(req: FetchFiles) -> dict:
        return fetches.start(req)

    @app.post("/fetch/probe")
    def fetch_probe(req: ProbeHub) -> dict:
        return probe(req.repo, req.revision, req.token)

    @app.get("/fetch/{fetch_id}")
    def fetch_status(fetch_id: str) -> dict:
        return fetches.get(fetch_id)

    @app.get("/transfers")
    def transfers() -> dict:
        # What a dashboard shows before a launch: fetches from the Hub and pushes being received
        # (time: the agent's clock, which the records' times are on).
        return {"time": time.time(), "fetches": fetches.listing(), "uploads": uploads.listing()}

    return app


# ---------------------------------------------------------------------------------------------
# Serving


def _bind(address: str, port: int) -> socket.socket:
    ip = ipaddress.ip_address(address.split("%")[0])  # an IP, never a name to look up
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    info = socket.getaddrinfo(address, port, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(info[0][4])
    return sock


def serve_agent(app: FastAPI, addresses: list[str], port: int, log_level: str = "info") -> None:
    """Serves app on each address (IPs only; 0.0.0.0 only when passed) until stopped; every rank
    it started is stopped on the way out."""
    if not addresses:
        raise ValueError("the agent needs at least one address to listen on")
    sockets = [_bind(a, port) for a in addresses]
    guard = Guard()
    # Outermost: it hands SignedOnly the callback that marks a connection verified as soon as
    # its signed headers pass (launcher/agent/guard.py). No limit_concurrency: it counted
    # strangers' idle sockets against everyone.
    app.user_middleware.insert(0, Middleware(MarkVerified, guard=guard))
    config = uvicorn.Config(
        app,
        log_level=log_level,
        lifespan="on",
        server_header=False,
        proxy_headers=False,
        http=guarded_protocol(guard),
        timeout_keep_alive=KEEP_ALIVE,
    )
    try:
        uvicorn.Server(config).run(sockets=sockets)
    finally:
        app.state.runs.stop_all()
        for sock in sockets:
            sock.close()
