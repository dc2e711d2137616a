"""mlxdist against mlx-lm's own distributed generation, on 2 local ranks, in one run.

Rows, each on the same model with 2 ranks on this machine:
- mlx-lm pipeline: `sharded_load(pipeline_group=...)` (benchmarks/mlx_lm_rank.py), its ranks
  started with mlx.launch's environment
- mlxdist pipeline: `mlxdist.rank` ranks, measured through the API as `mlxdist bench` does
- mlx-lm tensor parallel: `sharded_load(tensor_group=...)`
- mlxdist expert parallel: each rank holds half the routed experts
- mlxdist pipeline with 4 concurrent streams: aggregate decode tokens/s against one stream
Decode tokens/s is greedy, a fixed number of tokens (end-of-sequence ignored) after a prompt of
random token ids. Bytes sent per decoded token, summed over the ranks: mlxdist's own counters
(/mlxdist/stats), and for mlx-lm the kernel's per-socket TCP counters, both with the prompt's
share removed. The tools alternate over --rounds rounds, one running at a time; medians compared.

    .venv/bin/python benchmarks/compare_mlx_lm.py [--model PATH] [--tokens 32] [--rounds 2]

Without --model, the `1gb` tiny-r1 preset is generated once under ~/.cache/mlxdist/bench, in
R1's FP8 format; both tools dequantise it and run it in float32 (MLX's CPU expert matmul runs
only in float32; its 4-bit expert matmul on this CPU is slower still, about 0.4 tokens/s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from launcher.hostfile import free_ports, write_hostfile  # noqa: E402
from launcher.local import start_local, wait_ready  # noqa: E402
from mlxdist.client.bench import aggregate_tps, bench  # noqa: E402
from quantize.checkpoint import inspect_model  # noqa: E402
from quantize.nodes import even_split  # noqa: E402

RANKS = 2


def default_model() -> Path:
    home = Path(os.environ.get("MLXDIST_HOME", Path.home() / ".cache" / "mlxdist")) / "bench"
    source = home / "tiny-r1-1gb"
    if not (source / "config.json").exists():
        from mlxdist.testing.tiny_r1 import make_r1

        make_r1(source, preset="1gb")
    return source


def mlx_lm(model: Path, mode: str, tokens: int, prompt_len: int) -> dict:
    """mlx-lm's ranks, started with the environment mlx.launch gives them (MLX_RANK and a ring
    hostfile). Not under mlx.launch itself: on this 2-core machine its process spends about half
    a core relaying the ranks' output, which would slow mlx-lm down, not measure it."""
    worker = ROOT / "benchmarks" / "mlx_lm_rank.py"
    with tempfile.TemporaryDirectory() as tmp:
        hostfile = write_hostfile(
            Path(tmp) / "hosts.json", [[f"127.0.0.1:{p}"] for p in free_ports(RANKS)]
        )
        procs = []
        for rank in range(RANKS):
            env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile))
            cmd = [sys.executable, str(worker), str(model), mode, str(tokens), str(prompt_len)]
            out = subprocess.PIPE if rank == 0 else subprocess.DEVNULL
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.DEVNULL, text=True)
            )
        stdout, _ = procs[0].communicate(timeout=1800)
        for proc in procs[1:]:
            proc.wait(timeout=60)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        sys.exit(f"error: mlx-lm {mode} gave no figures (run benchmarks/mlx_lm_rank.py by hand)")
    row = json.loads(lines[-1])
    return {"decode_tps": row["decode_tps"], "bytes_per_token": sum(row["bytes_per_token"])}


@contextlib.contextmanager
def mlxdist(model: Path, parallel: str):
    """A running mlxdist cluster in one parallel mode (up only while it is measured: an idle
    rank waiting in a ring receive polls, and would take CPU from the other tool's run)."""
    layers = inspect_model(model).num_layers
    cluster = start_local(model, even_split(layers, RANKS), parallel=parallel)
    try:
        wait_ready(cluster)
        yield cluster.url
    finally:
        cluster.stop()


def one_stream(url: str, tokens: int, prompt_len: int) -> dict:
    r = bench(url, prompt_tokens=prompt_len, decode_tokens=tokens, streams=1)
    return {
        "decode_tps": r.decode_tps,
        "bytes_per_token": sum(x["bytes_per_token"] for x in r.per_rank),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    model = args.model or default_model()
    print(f"model {model}, {RANKS} ranks, prompt {args.prompt} tokens, {args.tokens} tokens")

    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    rows: dict[str, list[dict]] = {}
    for i in range(args.rounds):
        for mode, ours in (("pipeline", "pipeline"), ("tensor", "expert")):
            theirs = mlx_lm(model, mode, args.tokens, args.prompt)
            rows.setdefault(f"mlx-lm {mode}", []).append(theirs)
            with mlxdist(model, ours) as url:
                mine = one_stream(url, args.tokens, args.prompt)
                rows.setdefault(f"mlxdist {ours}", []).append(mine)
                print(f"round {i + 1}: mlx-lm {mode} {theirs}, mlxdist {ours} {mine}", flush=True)
                if ours == "pipeline":
                    one = aggregate_tps(url, vocab, 1, args.prompt, args.tokens)
                    four = aggregate_tps(url, vocab, 4, args.prompt, args.tokens)
                    rows.setdefault("pipeline 1 stream", []).append({"decode_tps": one})
                    rows.setdefault("pipeline 4 streams", []).append({"decode_tps": four})
                    print(f"round {i + 1}: 1 stream {one:.2f}, 4 streams {four:.2f}", flush=True)

    def med(name: str, key: str = "decode_tps") -> float:
        return statistics.median(r[key] for r in rows[name])

    print()
    print(f"| {'run':<28} | {'decode tok/s':>12} | {'bytes sent per token':>20} |")
    print(f"|{'-' * 30}|{'-' * 14}:|{'-' * 22}:|")
    for name in rows:
        sent = rows[name][0].get("bytes_per_token")
        sent_text = (
            f"{statistics.median(r['bytes_per_token'] for r in rows[name]):,.0f}"
            if sent is not None
            else ""
        )
        print(f"| {name:<28} | {med(name):>12.2f} | {sent_text:>20} |")
    print()
    ratios = [
        ("mlxdist pipeline / mlx-lm pipeline", "mlxdist pipeline", "mlx-lm pipeline", 1.0),
        ("mlxdist expert / mlx-lm tensor", "mlxdist expert", "mlx-lm tensor", 1.0),
        ("4 streams / 1 stream (pipeline)", "pipeline 4 streams", "pipeline 1 stream", 1.6),
    ]
    for label, a, b, target in ratios:
        print(f"{label + ':':<38} {med(a) / med(b):.2f}x (target >= {target})")


if __name__ == "__main__":
    main()
