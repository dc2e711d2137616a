"""mlxdist against mlx-lm's own distributed generation, on 2 local ranks, in one run.

Rows, each on the same model with 2 ranks on this machine:
- mlx-lm pipeline: `sharded_load(pipeline_group=...)` under mlx.launch (benchmarks/mlx_lm_rank.py)
- mlxdist pipeline: `mlxdist.rank` ranks, measured through the API as `mlxdist bench` does
- mlx-lm tensor parallel: `sharded_load(tensor_group=...)` under mlx.launch
- mlxdist expert parallel: each rank holds half the routed experts
- mlxdist pipeline with 4 concurrent streams: aggregate decode tokens/s against one stream
Decode tokens/s is greedy, a fixed number of tokens (end-of-sequence ignored) after a prompt of
random token ids. Bytes sent per decoded token: mlxdist's own counters (/mlxdist/stats), and for
mlx-lm the bytes each rank wrote (wchar of /proc/self/io), both with the prompt's share removed.
Rows alternate between the two tools over --rounds rounds; the medians are compared.

    .venv/bin/python benchmarks/compare_mlx_lm.py [--model PATH] [--tokens 32] [--rounds 2]

Without --model, the `1gb` tiny-r1 preset is generated once under ~/.cache/mlxdist/bench, in
R1's FP8 format; both tools dequantise it and run it in float32 (MLX's CPU expert matmul runs
only in float32; its 4-bit expert matmul on this CPU is slower still, about 0.4 tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from launcher.local import start_local, wait_ready  # noqa: E402
from mlxdist.bench import bench, prompt_ids, stream_once  # noqa: E402
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
    launch = Path(sys.executable).parent / "mlx.launch"
    worker = ROOT / "benchmarks" / "mlx_lm_rank.py"
    cmd = [str(launch), "--backend", "ring", "-n", str(RANKS), "--", sys.executable, str(worker)]
    cmd += [str(model), mode, str(tokens), str(prompt_len)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        sys.exit(f"error: mlx-lm {mode} failed:\n{out.stderr[-2000:]}")
    row = json.loads(lines[-1])
    return {"decode_tps": row["decode_tps"], "bytes_per_token": sum(row["bytes_per_token"])}


class Mlxdist:
    """A running mlxdist cluster in one parallel mode."""

    def __init__(self, model: Path, parallel: str):
        layers = inspect_model(model).num_layers
        self.cluster = start_local(model, even_split(layers, RANKS), parallel=parallel)
        wait_ready(self.cluster)
        self.url = self.cluster.url
        self.vocab = json.loads((model / "config.json").read_text())["vocab_size"]

    def one(self, tokens: int, prompt_len: int) -> dict:
        r = bench(self.url, prompt_tokens=prompt_len, decode_tokens=tokens, streams=1)
        sent = sum(rank["bytes_per_token"] for rank in r.per_rank)
        return {"decode_tps": r.decode_tps, "bytes_per_token": sent}

    def streams(self, n: int, tokens: int, prompt_len: int) -> float:
        """Aggregate decode tokens/s of n concurrent streams, prefill excluded."""
        runs = []

        def go(i: int) -> None:
            runs.append(stream_once(self.url, prompt_ids(prompt_len, self.vocab, 50 + i), tokens))

        threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = max(r.last for r in runs) - min(r.first for r in runs)
        return sum(r.tokens - 1 for r in runs) / wall

    def stop(self) -> None:
        self.cluster.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    model = args.model or default_model()
    print(f"model {model}, {RANKS} ranks, prompt {args.prompt} tokens, {args.tokens} tokens")

    rows: dict[str, list[dict]] = {}
    for mode, ours in (("pipeline", "pipeline"), ("tensor", "expert")):
        cluster = Mlxdist(model, ours)
        try:
            for i in range(args.rounds):
                theirs = mlx_lm(model, mode, args.tokens, args.prompt)
                rows.setdefault(f"mlx-lm {mode}", []).append(theirs)
                mine = cluster.one(args.tokens, args.prompt)
                rows.setdefault(f"mlxdist {ours}", []).append(mine)
                print(f"round {i + 1}: mlx-lm {mode} {theirs}, mlxdist {ours} {mine}", flush=True)
            if ours == "pipeline":
                for i in range(args.rounds):
                    one = cluster.streams(1, args.tokens, args.prompt)
                    four = cluster.streams(4, args.tokens, args.prompt)
                    rows.setdefault("pipeline 1 stream", []).append({"decode_tps": one})
                    rows.setdefault("pipeline 4 streams", []).append({"decode_tps": four})
                    print(f"round {i + 1}: 1 stream {one:.2f}, 4 streams {four:.2f}", flush=True)
        finally:
            cluster.stop()

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
