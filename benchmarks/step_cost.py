"""The cost of one forward step over n positions against one position, after a 300-token prompt
(what a speculative step checking n-1 drafts costs against a plain decode step), one mlx-lm
process on the demo model. Medians of a few repetitions; the cache is cut back after each.

    .venv/bin/python benchmarks/step_cost.py [--model PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlxdist.cli.models import resolve_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder or .gguf (default: demo model)")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    model, _ = load(str(resolve_model(args.model)))
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([list(range(300))]), cache=cache))

    def seconds(n: int) -> float:
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            mx.eval(model(mx.array([list(range(n))]), cache=cache))
            times.append(time.perf_counter() - t)
            for c in cache:
                c.trim(n)
        return statistics.median(times)

    seconds(1)  # warm-up
    one = seconds(1)
    print(f"{'positions':>9} {'ms':>8} {'x one':>6}")
    for n in (1, 2, 4, 7):
        t = seconds(n)
        print(f"{n:>9} {t * 1000:>8.1f} {t / one:>6.2f}")


if __name__ == "__main__":
    main()
