"""Prefill tokens/s of one prompt on 2 and on 3 pipeline ranks: mlxdist against mlx-lm's own
pipeline (`sharded_load(pipeline_group=...)`), in one run on this machine.

Prefill tokens/s is the prompt's tokens over the time to its first token: for mlx-lm, from the
stream_generate call to its first token inside rank 0 (benchmarks/mlx_lm_prefill_rank.py); for
mlxdist, from sending the request to the first token's arrival at the client, as `mlxdist bench`
times it (HTTP included, which counts against mlxdist). mlxdist's ranks cut the prompt in the
chunk launcher/prefillmodel.py chooses for the model and split, and send each chunk on without
waiting, so the stages work on different chunks at once; mlx-lm's pipeline passes the prompt
through one stage after another. A third row runs mlxdist's ranks with one 2048-token chunk (no
overlap, MLXDIST_PREFILL_CHUNK), so that what overlap gives is told apart from the rest (rank 0's
loop, the ranks' waiting: an idle mlx-lm rank polls its ring socket at 100% of a core, an idle
mlxdist rank sleeps in select()). Each repetition reads a prompt of its own (random token ids), so
mlxdist's prefix cache finds nothing to reuse. The tools alternate over --rounds rounds, one
running at a time; medians compared.

    .venv/bin/python benchmarks/prefill_vs_mlx_lm.py [--model PATH] [--prompt 512] [--rounds 2]

Without --model, the `1gb` tiny-r1 preset (as compare_mlx_lm.py), run in float32 by both tools.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from compare_mlx_lm import default_model  # noqa: E402

from launcher.hostfile import free_ports, write_hostfile  # noqa: E402
from launcher.local import start_local, wait_ready  # noqa: E402
from launcher.prefillmodel import PREFILL_CHUNK_ENV, rank_prefill_chunk  # noqa: E402
from launcher.rankspec import PREFILL_CHUNK  # noqa: E402
from mlxdist.client.bench import prompt_ids, stream_once  # noqa: E402
from quantize.checkpoint import inspect_model  # noqa: E402
from quantize.nodes import even_split  # noqa: E402

TARGET = 1.3


def mlx_lm(model: Path, ranks: int, prompts: list[list[int]]) -> list[float]:
    """Seconds to the first token of each prompt on mlx-lm's pipeline: its ranks started with the
    environment mlx.launch gives them (not under mlx.launch, whose relay takes half a core here)."""
    worker = ROOT / "benchmarks" / "mlx_lm_prefill_rank.py"
    with tempfile.TemporaryDirectory() as tmp:
        hostfile = write_hostfile(
            Path(tmp) / "hosts.json", [[f"127.0.0.1:{p}"] for p in free_ports(ranks)]
        )
        procs = []
        for rank in range(ranks):
            env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile))
            cmd = [sys.executable, str(worker), str(model), json.dumps(prompts)]
            out = subprocess.PIPE if rank == 0 else subprocess.DEVNULL
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.DEVNULL, text=True)
            )
        stdout, _ = procs[0].communicate(timeout=3600)
        for proc in procs[1:]:
            proc.wait(timeout=60)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        sys.exit("error: mlx-lm gave no figures (run benchmarks/mlx_lm_prefill_rank.py by hand)")
    return json.loads(lines[-1])["seconds"]


def mlxdist(model: Path, split: list[int], prompts: list[list[int]], chunk: int) -> list[float]:
    """Seconds to the first token of each prompt through a running mlxdist cluster's API, its
    prefill in chunks of `chunk` (up only while it is measured: the other tool gets the whole
    machine)."""
    cluster = start_local(model, split, env={PREFILL_CHUNK_ENV: str(chunk)})
    try:
        wait_ready(cluster)
        stream_once(cluster.url, prompts[0][:8], 2)  # warm up
        return [stream_once(cluster.url, p, 1).first for p in prompts]
    finally:
        cluster.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--repeat", type=int, default=2, help="prompts per tool and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ranks", default="2,3", help="pipeline sizes to measure")
    args = p.parse_args()
    model = args.model or default_model()
    config = json.loads((model / "config.json").read_text())
    layers = inspect_model(model).num_layers
    print(
        f"model {model}, prompt {args.prompt} tokens, {args.repeat} prompts x {args.rounds} rounds"
    )

    rows = []
    for ranks in map(int, args.ranks.split(",")):
        split = even_split(layers, ranks)
        chosen = rank_prefill_chunk(config, split, "ring")
        tools = {"mlx-lm pipeline": None, f"mlxdist, chunk {chosen} (chosen)": chosen}
        if chosen != PREFILL_CHUNK:  # the same ranks with no overlap: mlx-lm's one chunk
            tools[f"mlxdist, chunk {PREFILL_CHUNK} (no overlap)"] = PREFILL_CHUNK
        speeds: dict[str, list[float]] = {name: [] for name in tools}
        for i in range(args.rounds):
            prompts = [
                prompt_ids(args.prompt, config["vocab_size"], seed=1000 * ranks + 10 * i + j)
                for j in range(args.repeat)
            ]
            for name, chunk in tools.items():
                if chunk is None:
                    seconds = mlx_lm(model, ranks, prompts)
                else:
                    seconds = mlxdist(model, split, prompts, chunk)
                speeds[name] += [args.prompt / x for x in seconds]
                got = [round(args.prompt / x, 2) for x in seconds]
                print(f"{ranks} ranks, round {i + 1}: {name}: {got} tok/s", flush=True)
        base = statistics.median(speeds["mlx-lm pipeline"])
        for name, values in speeds.items():
            rows.append((ranks, split, name, statistics.median(values), base))
    print()
    print("| ranks | split | run | prefill tok/s | / mlx-lm |")
    print("|------:|:------|:----|--------------:|---------:|")
    for ranks, split, name, tps, base in rows:
        print(f"| {ranks} | {split} | {name} | {tps:.2f} | {tps / base:.2f}x |")
    print()
    for ranks, _, name, tps, base in rows:
        if "chosen" in name:
            print(
                f"mlxdist / mlx-lm prefill, {ranks} ranks: {tps / base:.2f}x (target >= {TARGET})"
            )


if __name__ == "__main__":
    main()
