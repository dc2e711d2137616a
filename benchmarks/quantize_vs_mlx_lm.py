"""Throughput and peak memory of `mlxdist quantize` against `mlx_lm.convert`, same settings.

Both run in fresh processes on the same checkpoint (tiny-r1's 1 GB preset without the MTP
layer, which mlx_lm.convert cannot drop), alternating, so that machine noise falls on both.
Throughput is source bytes per second of the conversion call; memory is the process's peak
resident set (VmHWM) minus its resident set just before the call.

    .venv/bin/python benchmarks/quantize_vs_mlx_lm.py [--rounds 2] [--bits 4] [--group-size 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs one conversion in this fresh process and prints its seconds and memory as JSON.
_CHILD = """
import json, sys, time
from quantize.memory import peak_rss, rss_now
tool, src, out, bits, group = sys.argv[1:6]
if tool == "mlx_lm":
    from mlx_lm import convert
    run = lambda: convert(src, out, quantize=True, q_bits=int(bits), q_group_size=int(group))
else:
    from mlxdist.cli import app
    args = ["quantize", src, out, "--bits", bits, "--group-size", group]
    run = lambda: app(args, standalone_mode=False)
start = rss_now()
t = time.perf_counter()
run()
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "peak": peak_rss(), "start": start}))
"""


def convert_once(tool: str, src: Path, out: Path, bits: int, group: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", _CHILD, tool, str(src), str(out), str(bits), str(group)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    args = p.parse_args()

    sys.path.insert(0, str(ROOT))
    from mlxdist.testing.tiny_r1 import make_r1

    work = Path(tempfile.mkdtemp(prefix="mlxdist-bench-"))
    try:
        src = make_r1(work / "src", preset="1gb", overrides={"num_nextn_predict_layers": 0})
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(
            f"source: tiny-r1 1gb, {size / 1e9:.3f} GB, {args.bits} bits, group {args.group_size}"
        )
        print(
            f"{'round':>5} {'tool':>8} {'seconds':>8} {'GB/s':>6} {'peak MiB':>9} {'above MiB':>10}"
        )
        rates: dict[str, list[float]] = {"mlx_lm": [], "mlxdist": []}
        mems: dict[str, list[float]] = {"mlx_lm": [], "mlxdist": []}
        for r in range(args.rounds):
            for tool in ("mlx_lm", "mlxdist"):
                m = convert_once(tool, src, work / tool, args.bits, args.group_size)
                rate = size / m["seconds"] / 1e9
                above = (m["peak"] - m["start"]) / 2**20
                rates[tool].append(rate)
                mems[tool].append(above)
                print(
                    f"{r + 1:>5} {tool:>8} {m['seconds']:>8.2f} {rate:>6.3f} "
                    f"{m['peak'] / 2**20:>9.0f} {above:>10.0f}"
                )
        speed = statistics.median(rates["mlxdist"]) / statistics.median(rates["mlx_lm"])
        memory = statistics.median(mems["mlxdist"]) / statistics.median(mems["mlx_lm"])
        print(f"throughput mlxdist / mlx_lm.convert: {speed:.2f}x (target >= 1.0)")
        print(f"peak memory above start, mlxdist / mlx_lm.convert: {memory:.2f}x (target <= 0.5)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
