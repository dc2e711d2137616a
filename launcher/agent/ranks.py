"""The rank processes this agent starts, watches and stops; only these are ever signalled."""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quantize.checkpoint import CheckpointError, read_config
from quantize.nodes import check_expert_node, check_node, even_experts

from ..rankenv import mlx_backend, rank_env, write_files
from ..rankspec import API_KEY_ENV, HEARTBEAT_TOKEN_ENV, PARENT_PID_ENV, RANK_MODULE, RankSpec
from .errors import Refused
from .requests import StartRank
from .uploads import confine

MiB = 2**20
STOP_TIMEOUT = 5.0


def model_folder(root: Path, req: StartRank) -> Path:
    """req's model folder in root; refused unless it is one, cut for req's split and rank."""
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


NO_PDEATHSIG_ENV = "MLXDIST_NO_PDEATHSIG"  # "1": ranks rely on their own watch, as on macOS


def _pdeathsig() -> Callable[[], None] | None:
    """Linux's parent-death signal for the ranks, unless NO_PDEATHSIG_ENV turns it off (macOS
    has none: there a rank's own watch of its parent is all, and tests take that path too)."""
    if sys.platform != "linux" or os.environ.get(NO_PDEATHSIG_ENV) == "1":
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
        backend=mlx_backend(req.backend),  # jaccl-ring: jaccl, with MLX_JACCL_RING=1
        max_context=req.max_context,
        heartbeat=_heartbeat(req) if req.heartbeat_port else None,
        node=req.node,
        kv_bits=req.kv_bits,
        prompt_cache_bytes=req.prompt_cache_bytes,
        speculative=req.speculative,
        draft_tokens=req.draft_tokens,
        view=req.view,
        **api_settings(req),
    )


def api_settings(req: StartRank) -> dict:
    """RankSpec's settings of rank 0's API in a request (its key travels apart)."""
    settings = {"docs": req.docs, "allowed_hosts": req.allowed_hosts}
    settings["cors_origins"] = req.cors_origins
    return settings | ({"max_body_mb": req.max_body_mb} if req.max_body_mb else {})


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
        env[PARENT_PID_ENV] = str(os.getpid())
        if req.heartbeat_token:  # in the environment, not on a command line others can read
            env[HEARTBEAT_TOKEN_ENV] = req.heartbeat_token
        env.pop(API_KEY_ENV, None)
        if req.api_key:  # as the token
            env[API_KEY_ENV] = req.api_key
        # As mlx.launch gives a rank of this backend, its files (ring hostfile, RDMA devices) in
        # the run's folder; a single rank runs without a ring.
        mine = rank_env(
            req.rank, len(req.split), req.backend, req.hostfile, req.rdma, req.coordinator
        )
        env |= write_files(mine, folder)
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
