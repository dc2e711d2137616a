"""Start N ranks as processes on this machine, the way mlx.launch would, and stop them all."""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

from quantize.errors import UserError
from quantize.nodes import even_experts, expert_node_folder, node_folder

from .hostfile import free_ports
from .rankenv import rank_env, write_files
from .rankspec import (
    API_KEY_ENV,
    DRAFT_TOKENS,
    HEARTBEAT_TOKEN_ENV,
    NODE_FAILED,
    PEER_GONE,
    RANK_MODULE,
    RankSpec,
)

_VERDICT = "[rank 0] node failure: "


class LaunchError(UserError):
    """The cluster could not be started; the message says which rank and why."""


def verdict(log_text: str) -> str | None:
    """Rank 0's word on which node failed, from its log."""
    lines = [x for x in log_text.splitlines() if x.startswith(_VERDICT)]
    return lines[-1][len(_VERDICT) :] if lines else None


def describe_failure(said: str | None, exited: list[tuple[str, int, str]]) -> str | None:
    """One line on what failed: rank 0's verdict (None without one) and, of (who, exit code,
    last log line) for the ranks that exited, the first that did not leave only because rank 0 or
    a ring peer went away."""
    causes = [e for e in exited if e[1] not in (NODE_FAILED, PEER_GONE) and "peer" not in e[2]]
    if not (causes or exited):
        return said
    who, code, tail = (causes or exited)[0]
    if code < 0:
        detail = f"{who} was killed by {signal.Signals(-code).name}"
    else:
        detail = f"{who} exited with code {code}: {tail or 'no output'}"
    if said is None:
        return detail
    return f"{said}; {detail}" if causes else said


@dataclass
class Cluster:
    procs: list[subprocess.Popen]
    url: str
    run_dir: Path
    logs: list[Path] = field(default_factory=list)

    def failure(self) -> str | None:
        """Names the rank that failed first: its peers then fail too, only because it went away."""
        exited = [r for r, p in enumerate(self.procs) if p.poll() is not None]
        if not exited:
            return None
        said = verdict(self.log_tail(0, 200)) if self.procs[0].returncode == NODE_FAILED else None
        node = socket.gethostname()  # every rank runs here
        codes = [
            (f"rank {r} on node {node}", self.procs[r].returncode, self.log_tail(r, 1))
            for r in exited
        ]
        return describe_failure(said, codes)

    def stop(self, timeout: float = 5.0) -> None:
        """Stops every rank: SIGTERM, then SIGKILL for any still there after timeout."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.send_signal(signal.SIGCONT)  # a stopped rank wakes to its SIGTERM
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def log_tail(self, rank: int, lines: int = 5) -> str:
        try:
            text = self.logs[rank].read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


def _die_with_parent() -> None:
    # Linux only: the kernel kills the rank when the launcher dies, even by SIGKILL.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def start_local(
    model: Path,
    split: list[int],
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    name: str | None = None,
    run_dir: Path | None = None,
    env: dict[str, str] | None = None,
    parallel: str = "pipeline",
    experts: list[int] | None = None,
    attention: str | None = None,
    max_context: int | None = None,
    api: dict | None = None,
    kv_bits: int | None = None,
    prompt_cache_bytes: int | None = None,
    speculative: str = "none",
    draft_tokens: int = DRAFT_TOKENS,
    view: str | None = None,
) -> Cluster:
    """Starts len(split) ranks on this machine over the ring backend on loopback.

    parallel "expert" or "tensor": every rank runs every layer and only len(split) counts;
    experts gives the routed experts per rank (default: as even as possible); attention
    "sharded" or "replicated" for expert mode's attention heads and shared experts (default:
    the rank's, sharded where they divide). max_context: tokens a request may use (default:
    the model's own limit). api: rank 0's API settings (RankSpec's max_body_mb, docs,
    allowed_hosts, cors_origins) and its api_key, which goes in rank 0's environment only.
    kv_bits: every rank's KV cache quantised to 4 or 8 bits; prompt_cache_bytes: rank 0's
    budget of kept prefixes (0: off; None: the rank's own default). speculative,
    draft_tokens: rank 0's speculative decoding ("none" or "ngram") and drafts per step.
    view: rank 0's view of the cluster for its dashboard (JSON text, launcher/clusterview.py).
    """
    api = dict(api or {})
    key = api.pop("api_key", None)
    n = len(split)
    run_dir = Path(run_dir or tempfile.mkdtemp(prefix="mlxdist-run-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    ports = free_ports(n + 2)
    http_port = port or ports[-1]
    ring = [[f"127.0.0.1:{p}"] for p in ports[:n]]
    spec = RankSpec.for_split(
        str(model),
        split,
        parallel,
        experts,
        attention=attention or "sharded",
        name=name or Path(model).name,
        host=host,
        port=http_port,
        heartbeat=f"127.0.0.1:{ports[n]}",
        max_context=max_context,
        kv_bits=kv_bits,
        **api,
    )
    # rank 0's alone: it tells the others the budget, and drafts the tokens they verify (with
    # R1's MTP layer every rank knows, and the one that holds the head drafts)
    first = {"prompt_cache_bytes": prompt_cache_bytes, "view": view}
    drafts = {"speculative": speculative, "draft_tokens": draft_tokens}
    first |= drafts
    if speculative == "mtp":
        spec = replace(spec, **drafts)
    token = secrets.token_hex(16)
    procs, logs = [], []
    for rank in range(n):
        # A model cut for this split (or these experts) gives each rank its own node folder.
        if parallel == "expert":
            folder = expert_node_folder(model, experts or even_experts(model, n), rank)
        elif parallel == "pipeline":
            folder = node_folder(model, split, rank)
        else:
            folder = Path(model)
        mine = replace(spec, model=str(folder), **(first if rank == 0 else {}))
        rank_cmd = [sys.executable, "-m", RANK_MODULE, *mine.to_argv()]
        variables = dict(os.environ) | (env or {}) | {HEARTBEAT_TOKEN_ENV: token}
        variables.pop(API_KEY_ENV, None)
        if key and rank == 0:
            variables[API_KEY_ENV] = key
        # As mlx.launch gives a ring rank (the hostfile in run_dir, reusable with mlx.launch);
        # a single rank runs without a ring.
        variables |= write_files(rank_env(rank, n, "ring", ring), run_dir)
        log = run_dir / f"rank-{rank}.log"
        with open(log, "wb") as out:
            procs.append(
                subprocess.Popen(
                    rank_cmd,
                    env=variables,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches the launcher, which stops the ranks
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
            )
        logs.append(log)
    return Cluster(procs, f"http://{host}:{http_port}", run_dir, logs)


def wait_ready(cluster, timeout: float = 600.0, on_tick=None) -> dict:
    """Waits until rank 0 answers /health (every rank has loaded by then); returns its answer.

    cluster: anything with .url and .failure() (a message once a rank has exited, else None).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if failure := cluster.failure():
            time.sleep(0.5)  # let the first failure's peers fail too, then name the first
            raise LaunchError(f"while loading, {cluster.failure() or failure}")
        try:
            r = httpx.get(cluster.url + "/health", timeout=2.0)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        if on_tick:
            on_tick()
        time.sleep(0.2)
    raise LaunchError(f"the ranks did not finish loading within {timeout:.0f} s")
