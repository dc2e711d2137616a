"""Ranks on hosts without an agent, started over ssh the way mlx.launch does: one remote
shell per rank that writes the hostfile, records its pid, and execs the rank entrypoint.
The model folder must already be at the same path on that host (as mlx.launch assumes)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .agent_client import AgentError
from .rankspec import RANK_MODULE, RankSpec


def rank_script(
    rank: int,
    world: int,
    hostfile: list[list[str]],
    python: str,
    argv: list[str],
    pidfile: str,
) -> str:
    """The remote shell script for one rank; every value is quoted."""
    script = f"echo $$ > {shlex.quote(pidfile)}; "
    script += f"export MLX_RANK={rank} MLX_WORLD_SIZE={world}; "
    if world > 1:
        script += "f=$(mktemp); "
        script += f'printf %s {shlex.quote(json.dumps(hostfile))} > "$f"; '
        script += 'export MLX_HOSTFILE="$f"; '
    script += "exec " + " ".join(shlex.quote(a) for a in [python, *argv])
    return script


def rank_spec(p: dict) -> RankSpec:
    """The rank an agent's start_rank request p asks for (ranks over ssh have no heartbeat)."""
    return RankSpec.for_split(
        p["model"],
        p["split"],
        p.get("parallel", "pipeline"),
        p.get("experts"),
        host=p["http_host"],
        port=int(p["http_port"]),
        name=p["name"],
        backend=p.get("backend", "ring"),
        max_context=int(p["max_context"]) if p.get("max_context") else None,
    )


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
        world = len(p["split"])
        script = rank_script(p["rank"], world, p["hostfile"], self.python, argv, pidfile)
        log = self.logs / f"{run_id}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                self._argv(script), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
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
                subprocess.run(self._argv(kill), capture_output=True, timeout=30)
        for r in self.runs:
            try:
                r.proc.wait(10)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()
