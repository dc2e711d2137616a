"""`mlxdist serve --local N` for a benchmark: started in a process of its own, waited for until
its API answers, and stopped as a user stops it (Ctrl-C)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from launcher.hostfile import free_ports  # noqa: E402


def serve(path: Path, ranks: int, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """The server's process and URL, once /v1/models answers (exits in one line if it dies)."""
    (port,) = free_ports(1)
    cmd = [sys.executable, "-m", "mlxdist.cli", "serve", str(path), "--local", str(ranks)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port), *extra], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: the server exited: {log.read_text(errors='replace')[-800:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit("error: the server did not come up in 600 s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
