"""`mlxdist agent`: the control service on every Mac. It receives model shards and starts, watches
and stops this Mac's MLX rank for the launcher.

Every request is signed (launcher.auth) and checked before any handler runs, 404s included.
Nothing a request carries becomes a command or a flag: a rank is always
`python -m mlxdist.rank` with validated values, and files land only inside models_dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from quantize.checkpoint import CheckpointError, read_config, sha256_file
from quantize.nodes import check_expert_node, check_node, even_experts, node_manifest

from ..auth import AuthError, Verifier
from ..hostfile import ring_hostfile
from ..rankspec import HEARTBEAT_TOKEN_ENV, RANK_MODULE, RankSpec

MiB = 2**20
STOP_TIMEOUT = 5.0
PARTIAL = ".partial"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # never starts with "-": not a flag
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PORT = re.compile(r"[0-9]{1,5}")
_SCOPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}")  # en0, bridge0, 4


class Refused(Exception):
    """A request the agent will not carry out: answered as {"error": message, **extra}."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


class _Disconnected(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Request bodies


def _check_ip(value: str) -> str:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    scope = getattr(ip, "scope_id", None)  # ipaddress takes any text after "%" as the scope
    if scope is not None and not _SCOPE.fullmatch(scope):
        raise ValueError(f"{value!r}: the scope must be an interface name or number")
    return str(ip)


def _check_ring_entry(entry: str) -> None:
    host, _, port = entry.rpartition(":")
    if not _PORT.fullmatch(port):
        raise ValueError(f"{entry!r} is not ip:port")
    _check_ip(host.removeprefix("[").removesuffix("]"))


class StartRank(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=1024)
    split: list[Annotated[int, Field(ge=1, le=1000)]] = Field(min_length=1, max_length=64)
    rank: int = Field(ge=0)
    hostfile: list[list[Annotated[str, Field(max_length=64)]]] = Field(
        default_factory=list, max_length=64
    )
    http_host: str = Field(max_length=64)
    http_port: int = Field(ge=1024, le=65535)
    name: str
    backend: Literal["ring"] = "ring"
    max_context: int | None = Field(None, ge=1, le=10_000_000)
    # Rank 0 hears every rank's heartbeat on http_host:heartbeat_port; the token shows it is one.
    heartbeat_port: int | None = Field(None, ge=1024, le=65535)
    heartbeat_token: str | None = Field(None, pattern=r"^[0-9a-f]{32}$")
    node: str | None = None  # the launcher's name for this host, in failure reports
    # expert: len(split) ranks run every layer, each with its routed experts (counts per rank);
    # tensor: len(split) ranks each hold 1/N of every layer, read from the whole model
    parallel: Literal["pipeline", "expert", "tensor"] = "pipeline"
    experts: list[Annotated[int, Field(ge=1, le=100_000)]] | None = Field(None, max_length=64)

    @field_validator("http_host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _check_ip(value)

    @field_validator("name", "node")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not _NAME.fullmatch(value):
            raise ValueError("name must be 1-64 letters, digits, '.', '_' or '-', not starting '-'")
        return value

    @model_validator(mode="after")
    def _ranks(self) -> StartRank:
        size = len(self.split)
        if self.experts is not None and (self.parallel != "expert" or len(self.experts) != size):
            raise ValueError("experts gives one count per rank, in expert mode only")
        if self.rank >= size:
            raise ValueError(f"rank {self.rank} is not below the {size} ranks of the split")
        if size > 1 and len(self.hostfile) != size:
            raise ValueError(f"hostfile needs one entry per rank ({size})")
        if size == 1 and len(self.hostfile) > 1:
            raise ValueError("a single rank takes no hostfile")
        if self.hostfile:
            for entries in self.hostfile:
                if len(entries) > 16:
                    raise ValueError("at most 16 addresses per rank")
                for entry in entries:
                    _check_ring_entry(entry)
            ring_hostfile(self.hostfile)
        return self


class CompleteFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    path: str = Field(min_length=1, max_length=1024)
    size: int = Field(ge=0)
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str) -> str:
        value = value.lower()
        if not _SHA256.fullmatch(value):
            raise ValueError("sha256 must be 64 hex digits")
        return value


# ---------------------------------------------------------------------------------------------
# Paths confined to models_dir


def rel_parts(rel: str) -> list[str]:
    """The components of a safe relative path; Refused(400) for anything else."""
    if not rel or len(rel) > 1024 or "\0" in rel or "\\" in rel or rel.startswith("/"):
        raise Refused(400, f"path {rel!r} must be relative, with '/' between names")
    parts = rel.split("/")
    if len(parts) > 16:
        raise Refused(400, f"path {rel!r} is too deep")
    for part in parts:
        if not _COMPONENT.fullmatch(part) or part.endswith(PARTIAL):
            raise Refused(400, f"path {rel!r}: {part!r} is not an allowed name")
    return parts


def confine(root: Path, rel: str) -> Path:
    """root/rel, refused when any existing part of it is a symlink or it leaves root."""
    path = root.joinpath(*rel_parts(rel))
    try:
        real = path.resolve()
    except (OSError, RuntimeError):
        raise Refused(400, f"path {rel!r} cannot be resolved") from None
    # root is resolved and the parts hold no "..": any difference is a symlink on the way.
    if real != path or not real.is_relative_to(root):
        raise Refused(400, f"path {rel!r} goes through a symlink")
    return path


def _partial(path: Path) -> Path:
    """path's partial file; refused when something other than a regular file holds its name."""
    partial = path.with_name(path.name + PARTIAL)
    if partial.is_symlink() or (partial.exists() and not partial.is_file()):
        raise Refused(400, f"{partial.name} is not a regular file")
    return partial


class Uploads:
    """Resumable uploads: chunks append to REL.partial, which becomes REL once verified."""

    def __init__(self, root: Path):
        self.root = root
        self._locks: dict[Path, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, path: Path) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(path, threading.Lock())

    def status(self, rel: str) -> dict:
        path = confine(self.root, rel)
        partial = _partial(path)
        if partial.is_file():
            return {"size": partial.stat().st_size, "complete": False}
        if path.is_file():
            return {"size": path.stat().st_size, "complete": True}
        return {"size": 0, "complete": False}

    def write(self, rel: str, offset: int, data: bytes) -> dict:
        path = confine(self.root, rel)
        with self._lock(path):
            if path.is_dir():
                raise Refused(409, f"{rel} is a folder")
            partial = _partial(path)
            current = partial.stat().st_size if partial.exists() else 0
            if offset not in (0, current):  # before any folder is made for a refused chunk
                raise Refused(409, f"offset {offset} is not the {current} bytes held", size=current)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise Refused(409, f"cannot make the folder for {rel}: {e.strerror}") from None
            path = confine(self.root, rel)  # again: the folders now exist
            partial = _partial(path)
            current = partial.stat().st_size if partial.exists() else 0
            if offset not in (0, current):
                raise Refused(409, f"offset {offset} is not the {current} bytes held", size=current)
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if offset == 0 else 0)
            try:
                fd = os.open(partial, flags, 0o644)
            except OSError as e:
                raise Refused(409, f"cannot write {rel}: {e.strerror}") from None
            with os.fdopen(fd, "wb") as f:
                f.seek(offset)
                f.write(data)
            return {"size": offset + len(data)}

    def complete(self, rel: str, size: int, sha256: str) -> dict:
        """Verifies REL.partial and renames it to REL; with no partial, verifies REL itself.

        A size mismatch keeps the partial (the upload can resume); a sha256 mismatch deletes it,
        since its bytes are wrong and resuming would only append to them."""
        path = confine(self.root, rel)
        partial = _partial(path)
        with self._lock(path):
            if partial.is_file():
                _verify(partial, rel, size, sha256, discard=True)
                with open(partial, "rb") as f:
                    os.fsync(f.fileno())
                try:
                    os.replace(partial, path)
                except OSError as e:
                    raise Refused(409, f"cannot finish {rel}: {e.strerror}") from None
                return {"path": rel, "size": size, "sha256": sha256, "already": False}
            if path.is_file():
                _verify(path, rel, size, sha256, discard=False)
                return {"path": rel, "size": size, "sha256": sha256, "already": True}
        raise Refused(404, f"nothing was uploaded to {rel}")


def _verify(path: Path, rel: str, size: int, sha256: str, discard: bool) -> None:
    held = path.stat().st_size
    if held != size:
        raise Refused(400, f"{rel}: size mismatch, {held} bytes held, {size} expected", size=held)
    if sha256_file(path) != sha256:
        if discard:
            path.unlink()
        raise Refused(400, f"{rel}: sha256 mismatch" + (", upload discarded" if discard else ""))


def list_models(root: Path) -> list[dict]:
    """Model folders (with config.json) and node folders (nodes/<r>/manifest.json) in root."""
    models = []
    for folder in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        if not folder.is_dir() or not folder.resolve().is_relative_to(root):
            continue
        nodes = _list_nodes(root, folder)
        config = _read_config(folder / "config.json")
        if config is not None or nodes:
            models.append({"path": folder.name, "config": config, "nodes": nodes})
    return models


def _read_config(path: Path) -> dict | None:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = ("model_type", "num_hidden_layers")
    return {k: config.get(k) for k in keys} if isinstance(config, dict) else None


def _list_nodes(root: Path, folder: Path) -> list[dict]:
    nodes_dir = folder / "nodes"
    if not nodes_dir.is_dir():
        return []
    nodes = []
    for node in sorted(nodes_dir.iterdir()):
        try:
            manifest = node_manifest(node)
            if manifest is None or not node.resolve().is_relative_to(root):
                continue
            files = manifest.get("files", [])
            present = all(
                (node / f["name"]).is_file() and (node / f["name"]).stat().st_size == f["size"]
                for f in files
            )
            nodes.append(
                {
                    "path": node.relative_to(root).as_posix(),
                    "plan": manifest["plan"],
                    "layers": manifest.get("layers"),
                    "complete": present and (node / "config.json").is_file(),
                }
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # a half-written or foreign folder is simply not listed
    return nodes


# ---------------------------------------------------------------------------------------------
# Rank processes


def _pdeathsig() -> Callable[[], None] | None:
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not in the child

    def die_with_agent() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return die_with_agent


def rank_spec(model: Path, req: StartRank) -> RankSpec:
    """The rank a validated request asks for, from the model folder the agent resolved."""
    return RankSpec.for_split(
        str(model),
        req.split,
        req.parallel,
        req.experts,
        name=req.name,
        host=req.http_host,
        port=req.http_port,
        backend=req.backend,
        max_context=req.max_context,
        heartbeat=_heartbeat(req) if req.heartbeat_port else None,
        node=req.node,
    )


def rank_argv(python: str, model: Path, req: StartRank) -> list[str]:
    """The rank's command line: fixed flags, each followed by one validated value."""
    return [python, "-m", RANK_MODULE, *rank_spec(model, req).to_argv()]


def _heartbeat(req: StartRank) -> str:
    host = f"[{req.http_host}]" if ":" in req.http_host else req.http_host
    return f"{host}:{req.heartbeat_port}"


@dataclass
class Run:
    id: str
    rank: int
    model: str
    proc: subprocess.Popen
    log: Path

    def info(self) -> dict:
        code = self.proc.poll()
        return {
            "id": self.id,
            "rank": self.rank,
            "pid": self.proc.pid,
            "alive": code is None,
            "returncode": code,
            "model": self.model,
        }


class Runs:
    """The ranks this agent started; only these are ever signalled."""

    def __init__(self, runs_dir: Path, python: str):
        self.runs_dir = runs_dir
        self.python = python
        self._runs: dict[str, Run] = {}
        self._lock = threading.Lock()
        self._preexec = _pdeathsig()

    def start(self, model: Path, req: StartRank) -> Run:
        run_id = secrets.token_hex(6)
        folder = self.runs_dir / run_id
        folder.mkdir(mode=0o700)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
        env |= {"MLX_RANK": str(req.rank), "MLX_WORLD_SIZE": str(len(req.split))}
        if req.heartbeat_token:  # in the environment, not on a command line others can read
            env[HEARTBEAT_TOKEN_ENV] = req.heartbeat_token
        if len(req.split) > 1:  # as mlx.launch: a single rank runs without a ring
            hostfile = folder / "hostfile.json"
            hostfile.write_text(ring_hostfile(req.hostfile))
            env["MLX_HOSTFILE"] = str(hostfile)
        log = folder / "rank.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                rank_argv(self.python, model, req),
                env=env,
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=self._preexec,
            )
        run = Run(run_id, req.rank, req.model, proc, log)
        with self._lock:
            self._runs[run_id] = run
        return run

    def get(self, run_id: str) -> Run:
        with self._lock:
            run = self._runs.get(run_id)
        if run is None:
            raise Refused(404, f"no rank {run_id!r} on this agent")
        return run

    def all(self) -> list[Run]:
        with self._lock:
            return list(self._runs.values())

    def stop(self, runs: list[Run], timeout: float = STOP_TIMEOUT) -> list[dict]:
        """SIGTERM, then SIGKILL for any still running after timeout."""
        for run in runs:
            if run.proc.poll() is None:
                run.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for run in runs:
            try:
                run.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                run.proc.kill()
                run.proc.wait()
        return [run.info() for run in runs]

    def stop_all(self) -> list[dict]:
        return self.stop(self.all())


def tail_lines(path: Path, lines: int, max_bytes: int = 4 * MiB) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


# ---------------------------------------------------------------------------------------------
# Authentication before everything


def _target(scope: dict) -> str:
    path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string") or b""
    return (path + (b"?" + query if query else b"")).decode("latin-1")


async def _send_json(send, status: int, payload: dict, close: bool = False) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if close:  # the body may be unread: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class SignedOnly:
    """ASGI middleware: reads the body (capped, timed) and verifies the signature, or answers."""

    def __init__(self, app, verifier: Verifier, max_body: int, body_timeout: float):
        self.app = app
        self.verifier = verifier
        self.max_body = max_body
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await send({"type": "websocket.close", "code": 1008})
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self.verifier.check_headers(headers)  # before reading a body from a stranger
            body = await self._read_body(receive, headers)
            self.verifier.verify(scope["method"], _target(scope), body, headers)
        except AuthError as e:
            return await _send_json(send, e.status, {"error": e.reason}, close=True)
        except Refused as e:
            return await _send_json(send, e.status, {"error": e.message}, close=True)
        except _Disconnected:
            return None
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive, headers: dict[str, str]) -> bytes:
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise Refused(413, f"body larger than {self.max_body} bytes")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise Refused(408, "the body did not arrive in time") from None
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise Refused(413, f"body larger than {self.max_body} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# ---------------------------------------------------------------------------------------------
# The app


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


def _model_folder(root: Path, req: StartRank) -> Path:
    folder = confine(root, req.model)
    if not (folder / "config.json").is_file():
        raise Refused(400, f"model {req.model!r} is not a model folder in the models folder")
    try:
        if req.parallel == "expert":
            counts = req.experts or even_experts(folder, len(req.split))
            check_expert_node(folder, counts, req.rank)
        elif req.parallel == "tensor":  # every rank reads its cut of the whole model
            check_node(folder, [read_config(folder)["num_hidden_layers"]], 0)
        else:
            check_node(folder, req.split, req.rank)
    except (CheckpointError, ValueError) as e:  # a node folder cut for another split or rank
        raise Refused(409, str(e)) from None
    except (KeyError, TypeError) as e:
        raise Refused(400, f"model {req.model!r} has a malformed manifest ({e})") from None
    return folder


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
) -> FastAPI:
    """The agent's app; every request must be signed with secret."""
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    root = models_dir.resolve()
    if runs_dir is None:
        runs_dir = Path(tempfile.mkdtemp(prefix="mlxdist-agent-"))
    runs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    runs = Runs(runs_dir, python)
    uploads = Uploads(root)

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
    _error_handlers(app)
    app.add_middleware(
        SignedOnly, verifier=Verifier(secret, window), max_body=max_body, body_timeout=body_timeout
    )

    @app.get("/health")
    def health() -> dict:
        return {"ok": True, "ranks": sum(r.proc.poll() is None for r in runs.all())}

    @app.get("/facts")
    def get_facts() -> dict:
        return facts()

    @app.get("/models")
    def models() -> dict:
        return {"models": list_models(root)}

    @app.post("/ranks")
    async def start_rank(req: StartRank) -> dict:
        # Started on the event loop's thread, which lives as long as the agent: PR_SET_PDEATHSIG
        # fires when the forking *thread* exits, and idle worker threads exit after seconds.
        folder = _model_folder(root, req)
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
    config = uvicorn.Config(
        app,
        log_level=log_level,
        lifespan="on",
        server_header=False,
        proxy_headers=False,
        limit_concurrency=32,  # bounds the bodies held in memory while they are verified
    )
    try:
        uvicorn.Server(config).run(sockets=sockets)
    finally:
        app.state.runs.stop_all()
        for sock in sockets:
            sock.close()
