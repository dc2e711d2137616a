"""Decode tokens/s of mlxdist's parallel modes on one model, alternating, for A/B comparisons.

    .venv/bin/python benchmarks/modes_ab.py MODEL [--modes expert,tensor,expert,tensor]
        [--ranks 2] [--tokens 48] [--repeats 3]

Each mode listed starts its own local cluster, warms up, then streams --repeats greedy answers
of --tokens tokens (end-of-sequence ignored) and prints each one's decode tokens/s. List a
mode twice to interleave runs: the machine's noise then shows as the spread within a mode.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from launcher.local import start_local, wait_ready  # noqa: E402
from mlxdist.client.bench import stream_once  # noqa: E402
from quantize.checkpoint import inspect_model  # noqa: E402
from quantize.nodes import even_split  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--modes", default="expert,tensor,expert,tensor")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    split = even_split(inspect_model(args.model).num_layers, args.ranks)
    for mode in args.modes.split(","):
        cluster = start_local(args.model, split, parallel=mode)
        try:
            wait_ready(cluster, timeout=300)
            stream_once(cluster.url, [5, 6, 7], 4)
            runs = [
                stream_once(cluster.url, [9, 10, 11, 12], args.tokens).decode_tps
                for _ in range(args.repeats)
            ]
            print(mode, " ".join(f"{r:.2f}" for r in runs), flush=True)
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
