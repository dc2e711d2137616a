"""What a speculative pass costs on this machine, in one process: a decode step over one
position, a step over two positions with the acceptance rule, and the MTP layer's feed and draft,
on a tiny-r1 with an MTP layer (medians; the caches are cut back after each).

    .venv/bin/python benchmarks/mtp_pass_cost.py MODEL   # e.g. the fitted tiny-r1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlxdist.runtime.mtp_drafter import MTPDrafter  # noqa: E402
from mlxdist.runtime.sampling import Sampler  # noqa: E402
from mlxdist.runtime.speculative import verify  # noqa: E402
from mlxdist.runtime.stage import load_mtp_layer, load_stage  # noqa: E402
from quantize.checkpoint import read_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args()
    stage = load_stage(args.model, [read_config(args.model)["num_hidden_layers"]], 0)
    drafter = MTPDrafter(load_mtp_layer(args.model), 1, stage.model.lm_head, stage.inner.norm)
    drafter.start(1)
    cache, sampler = stage.make_cache(), Sampler()
    mx.eval(stage.forward(stage.embed(mx.array([list(range(3, 27))])), cache))

    def ms(step) -> float:
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000

    def one() -> None:
        h = stage.forward(stage.embed(mx.array([[5]])), cache)
        out = sampler(stage.logits(h[:, -1, :]))
        mx.eval(out)
        out.item()
        for c in cache:
            c.trim(1)

    def two() -> None:
        h = stage.forward(stage.embed(mx.array([[5, 6]])), cache)
        out = verify(stage.logits(h[0]), [6], sampler)
        out.tolist()
        for c in cache:
            c.trim(2)

    def draft() -> None:
        drafter.feed(1, mx.zeros((1, 2, stage.hidden_size)), [5, 6], 7)
        drafter.slots[1].cache[0].trim(2)

    one()  # warm-up
    plain, pair, mtp = ms(one), ms(two), ms(draft)
    print(f"one position {plain:.2f} ms; two, with the rule {pair:.2f} ms ({pair / plain:.2f}x)")
    print(f"the MTP layer's feed of two pairs and one draft {mtp:.2f} ms ({mtp / plain:.2f}x)")


if __name__ == "__main__":
    main()
