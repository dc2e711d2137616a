"""Continuous batching in lock step: aggregate decode tokens/s of 4 concurrent streams against 1
stream, in expert mode and in tensor mode, on 2 local ranks, in one run.

    .venv/bin/python benchmarks/lockstep_batching.py [--model PATH] [--tokens 48] [--prompt 32]
        [--streams 4] [--rounds 3] [--modes expert,tensor]

Each mode starts its own cluster and warms up; then greedy streams of --tokens tokens (end of
sequence ignored) after a prompt of random ids, --rounds times: one stream alone, then
--streams at once; the medians compared (the machine is shared: alternating shows its noise as
spread, not as a ratio). Aggregate decode tokens/s is `mlxdist bench`'s: the tokens that arrive
while every stream is decoding, over that time.

Without --model, expert mode runs the `tiny` tiny-r1 preset and tensor mode a tiny llama from
`mlxdist testing make-model` (float32), made once under ~/.cache/mlxdist/bench: models whose
decode step is mostly per-step cost (collectives, Python, syncs), as a memory-bound step is on
a Mac's GPU. On this machine's CPU, MLX's matmul is compute-bound (about 2 GFLOP/s): a bigger
model's step (`--model` the 1gb preset) grows with the batch, and batching gains little there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.local import start_local, wait_ready  # noqa: E402
from mlxdist.client.bench import aggregate_tps, stream_once  # noqa: E402

RANKS = 2


def default_model(mode: str) -> Path:
    """The small model each mode runs by default, made once."""
    home = Path(os.environ.get("MLXDIST_HOME", Path.home() / ".cache" / "mlxdist")) / "bench"
    if mode == "expert":
        out = home / "tiny-r1-tiny"
        if not (out / "config.json").exists():
            from mlxdist.testing.tiny_r1 import make_r1

            make_r1(out, preset="tiny")
        return out
    out = home / "llama-tiny"
    if not (out / "config.json").exists():
        from mlxdist.testing.make_model import make_model

        make_model("llama", out, overrides={"torch_dtype": "float32"})
    return out


def measure(model: Path, mode: str, vocab: int, args) -> tuple[float, float, int]:
    """Medians of 1 stream's tokens/s and of the streams' aggregate tokens/s, and the most
    sequences decoded in one step."""
    cluster = start_local(model, [1] * RANKS, parallel=mode)
    try:
        wait_ready(cluster, timeout=600)
        stream_once(cluster.url, [5, 6, 7], 4)  # warm up: first-call costs not counted
        ones, manys = [], []
        for _ in range(args.rounds):
            ones.append(aggregate_tps(cluster.url, vocab, 1, args.prompt, args.tokens))
            manys.append(aggregate_tps(cluster.url, vocab, args.streams, args.prompt, args.tokens))
            print(f"  {mode}: 1 stream {ones[-1]:.2f}, {args.streams} streams {manys[-1]:.2f}")
        peak = httpx.get(cluster.url + "/mlxdist/stats", timeout=120).json()["in_flight_peak"]
        return statistics.median(ones), statistics.median(manys), peak
    finally:
        cluster.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", default="expert,tensor")
    args = p.parse_args()
    print(f"{RANKS} ranks, prompt {args.prompt} tokens, {args.tokens} tokens")
    rows = []
    for mode in args.modes.split(","):
        model = args.model or default_model(mode)
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        one, many, peak = measure(model, mode, vocab, args)
        rows.append((mode, one, many, peak))
        print(f"{mode} on {model}: medians {one:.2f} and {many:.2f} tok/s", flush=True)
    print()
    print(f"| mode   | 1 stream tok/s | {args.streams} streams tok/s | ratio | most in one step |")
    print("|--------|---------------:|----------------:|------:|-----------------:|")
    for mode, one, many, peak in rows:
        print(f"| {mode:<6} | {one:14.2f} | {many:15.2f} | {many / one:5.2f} | {peak:16} |")


if __name__ == "__main__":
    main()
