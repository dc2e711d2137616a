"""Ranks on hosts without an agent, started over ssh the way mlx.launch does: one remote
shell per rank that writes the rank's files, records its pid, and execs the rank entrypoint.
The model folder must already be at the same path on that host (as mlx.launch assumes).

The launcher keeps each ssh client's stdin open: its first line holds the heartbeat token and,
for rank 0, after a space, its API key (never on a command line); its end, when the launcher
goes, tells the rank to leave."""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .agent_client import AgentError
from .rankenv import RankEnv, mlx_backend, rank_env
from .rankspec import (
    API_KEY_ENV,
    DRAFT_TOKENS,
    HEARTBEAT_TOKEN_ENV,
    MAX_BODY_MB,
    PARENT_PID_ENV,
    RANK_MODULE,
    STDIN_LIFELINE_ENV,
    RankSpec,
)


def rank_script(env: RankEnv, python: str, argv: list[str], pidfile: str) -> str:
    """The remote shell script for one rank; every value is quoted, and the token and API key
    are read from stdin into the environment."""
    script = f"echo $$ > {shlex.quote(pidfile)}; "
    script += 'read -r t k; [ "$t" = - ] && t=; '  # "-": no token, a key follows
    script += f'[ -z "$t" ] || export {HEARTBEAT_TOKEN_ENV}="$t"; '
    script += f'[ -z "$k" ] || export {API_KEY_ENV}="$k"; '
    paths = {}
    for i, (name, content) in enumerate(env.files.items()):
        script += f'f{i}=$(mktemp); printf %s {shlex.quote(content)} > "$f{i}"; '
        paths[name] = f"$f{i}"
    plain = {**env.env, STDIN_LIFELINE_ENV: "1"}
    script += "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in plain.items())
    script += "".join(f' {name}="{path}"' for name, path in paths.items())
    script += f" {PARENT_PID_ENV}=$PPID; "  # sshd: the rank's parent once the shell execs it
    script += "exec " + " ".join(shlex.quote(a) for a in [python, *argv])
    return script


def remote_env(p: dict) -> RankEnv:
    """The environment of the rank an agent's start_rank request p asks for."""
    return rank_env(
        p["rank"],
        len(p["split"]),
        p.get("backend", "ring"),
        p.get("hostfile") or None,
        p.get("rdma"),
        p.get("coordinator"),
    )


def rank_spec(p: dict) -> RankSpec:
    """The rank an agent's start_rank request p asks for."""
    beats = p.get("heartbeat_port")
    host = f"[{p['http_host']}]" if ":" in p["http_host"] else p["http_host"]
    return RankSpec.for_split(
        p["model"],
        p["split"],
        p.get("parallel", "pipeline"),
        p.get("experts"),
        host=p["http_host"],
        port=int(p["http_port"]),
        name=p["name"],
        backend=mlx_backend(p.get("backend", "ring")),  # jaccl-ring: jaccl, MLX_JACCL_RING=1
        max_context=int(p["max_context"]) if p.get("max_context") else None,
        heartbeat=f"{host}:{int(beats)}" if beats else None,
        node=p.get("node"),
        max_body_mb=int(p.get("max_body_mb") or MAX_BODY_MB),
        docs=bool(p.get("docs")),
        allowed_hosts=tuple(p.get("allowed_hosts") or ()),
        cors_origins=tuple(p.get("cors_origins") or ()),
        kv_bits=int(p["kv_bits"]) if p.get("kv_bits") else None,
        prompt_cache_bytes=_optional_int(p.get("prompt_cache_bytes")),
        speculative=p.get("speculative") or "none",
        draft_tokens=int(p.get("draft_tokens") or DRAFT_TOKENS),
        view=p.get("view"),
    )


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


@dataclass
class _Run:
    id: str
    rank: int
    proc: subprocess.Popen
    log: Path
    pidfile: str


@dataclass
class SshClient:
    """Speaks the part of AgentClient the launcher uses, over ssh."""

    destination: str
    python: str = sys.executable
    ssh: str = "ssh"
    runs: list[_Run] = field(default_factory=list)
    logs: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mlxdist-ssh-")))

    def _argv(self, script: str) -> list[str]:
        return [self.ssh, "-o", "BatchMode=yes", "--", self.destination, script]

    def facts(self) -> dict:
        return {}

    def start_rank(self, **p) -> dict:
        run_id = uuid.uuid4().hex[:12]
        argv = ["-m", RANK_MODULE, *rank_spec(p).to_argv()]
        pidfile = f"/tmp/mlxdist-{run_id}.pid"
        script = rank_script(remote_env(p), self.python, argv, pidfile)
        log = self.logs / f"{run_id}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                self._argv(script), stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT
            )
        try:  # held open from here on: the rank's lifeline
            token, key = p.get("heartbeat_token") or "", p.get("api_key")
            line = f"{token or '-'} {key}" if key else token  # neither holds a space
            proc.stdin.write(f"{line}\n".encode())
            proc.stdin.flush()
        except OSError:
            pass  # ssh already gone: ranks() reports it with its log
        self.runs.append(_Run(run_id, p["rank"], proc, log, pidfile))
        return {"id": run_id, "pid": proc.pid}

    def ranks(self) -> list[dict]:
        return [
            {
                "id": r.id,
                "rank": r.rank,
                "alive": r.proc.poll() is None,
                "returncode": r.proc.returncode,
            }
            for r in self.runs
        ]

    def log(self, run_id: str, tail: int = 200) -> str:
        for r in self.runs:
            if r.id == run_id:
                return "\n".join(r.log.read_text(errors="replace").splitlines()[-tail:])
        raise AgentError(f"no run {run_id}", 404)

    def stop_all(self) -> None:
        for r in self.runs:
            if r.proc.poll() is None:
                pid = shlex.quote(r.pidfile)
                kill = f"kill $(cat {pid}) 2>/dev/null; rm -f {pid}"
                subprocess.run(
                    self._argv(kill), stdin=subprocess.DEVNULL, capture_output=True, timeout=30
                )
        for r in self.runs:
            _close(r.proc)  # a rank the kill missed leaves by its lifeline
            try:
                r.proc.wait(10)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()


def _close(proc: subprocess.Popen) -> None:
    try:
        if proc.stdin:
            proc.stdin.close()
    except OSError:
        pass
