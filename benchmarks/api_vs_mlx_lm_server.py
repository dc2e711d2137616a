"""Time to first token and decode tokens/s of `mlxdist serve --local 1` against `mlx_lm.server`.

The servers run on this machine at once, one rank each, on the same model: mlxdist,
mlx_lm.server without its prompt cache (like for like: mlxdist has none yet), and mlx_lm.server
as it starts by default (+pc: a repeated prompt's KV cache is kept, so it is not read again).
Each round streams the same greedy /v1/chat/completions request to each, alternating the order,
and measures at the client from the server-sent events' arrival times: time to first token from
sending the request to the first text; decode tokens/s as the tokens after the first (the
server's own usage count) over the time from the first text to the last.

    .venv/bin/python benchmarks/api_vs_mlx_lm_server.py [--model PATH] [--tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from launcher.hostfile import free_ports  # noqa: E402
from mlxdist.cli.models import resolve_model  # noqa: E402

PROMPT = "Write a long story about a dragon who learns to bake bread."


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )


def wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: {url} exited: {log.read_text(errors='replace')[-500:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    sys.exit(f"error: {url} did not come up in {timeout:.0f} s")


def one_request(url: str, tokens: int) -> dict:
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    stamps, text, usage = [], [], None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter())
                    text.append(choice["delta"]["content"])
    n = usage["completion_tokens"] if usage else len(stamps)
    return {
        "ttft": stamps[0] - sent,
        "rate": (n - 1) / (stamps[-1] - stamps[0]),
        "tokens": n,
        "text": "".join(text),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder or .gguf (default: demo model)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    path = resolve_model(args.model)
    logs = Path(tempfile.mkdtemp(prefix="mlxdist-bench-"))
    cached_port, theirs_port, ours_port = free_ports(3)
    py = sys.executable
    mlx_lm_server = [py, "-m", "mlx_lm", "server", "--model", str(path), "--port"]
    servers = {
        # mlx_lm.server keeps the KV cache of past prompts: a repeated prompt is not read again.
        # mlxdist has no prompt cache yet, so the like-for-like figures are without it.
        "mlx_lm.server": (
            f"http://127.0.0.1:{theirs_port}",
            [*mlx_lm_server, str(theirs_port), "--prompt-cache-size", "0"],
        ),
        "mlxdist": (
            f"http://127.0.0.1:{ours_port}",
            [py, "-m", "mlxdist.cli", "serve", str(path), "--local", "1", "--port", str(ours_port)],
        ),
        "mlx_lm.server+pc": (f"http://127.0.0.1:{cached_port}", [*mlx_lm_server, str(cached_port)]),
    }
    procs = {}
    try:
        for name, (_, cmd) in servers.items():
            procs[name] = start(cmd, logs / f"{name}.log")
        for name, (url, _) in servers.items():
            wait_up(url, procs[name], logs / f"{name}.log")
            one_request(url, 8)  # warm-up
        print(f"model {path.name}, greedy, up to {args.tokens} tokens, streamed chat requests")
        print(f"{'round':>5}  {'server':<16} {'TTFT s':>7} {'decode tok/s':>13} {'tokens':>7}")
        results: dict[str, list[dict]] = {name: [] for name in servers}
        texts = set()
        for i in range(args.rounds):
            order = list(servers) if i % 2 == 0 else list(reversed(servers))  # alternating
            for name in order:
                r = one_request(servers[name][0], args.tokens)
                results[name].append(r)
                texts.add(r["text"])
                print(
                    f"{i + 1:>5}  {name:<16} {r['ttft']:>7.3f} {r['rate']:>13.2f} {r['tokens']:>7}"
                )
        med = {
            name: (
                statistics.median(r["ttft"] for r in rs),
                statistics.median(r["rate"] for r in rs),
            )
            for name, rs in results.items()
        }
        for name, (ttft, rate) in med.items():
            print(f"{'median':>5}  {name:<16} {ttft:>7.3f} {rate:>13.2f}")
        (t_ttft, t_rate), (o_ttft, o_rate) = med["mlx_lm.server"], med["mlxdist"]
        print(f"decode rate mlxdist / mlx_lm.server: {o_rate / t_rate:.3f} (target >= 0.95)")
        print(f"time to first token mlxdist / mlx_lm.server: {o_ttft / t_ttft:.3f}")
        c_ttft, c_rate = med["mlx_lm.server+pc"]
        print(
            f"with its prompt cache (+pc): decode {o_rate / c_rate:.3f}, TTFT {o_ttft / c_ttft:.2f}"
        )
        print(f"every answer the same text: {'yes' if len(texts) == 1 else 'no'}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
