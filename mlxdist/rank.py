"""One MLX rank: `python -m mlxdist.rank --model PATH --split a,b,...`.

Started with the environment mlx.launch gives a rank (MLX_RANK, MLX_HOSTFILE). Loads only its
layers; rank 0 then serves the API and drives the ring, the others serve the ring.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time


def _watch_parent(parent: int) -> None:
    # A rank never outlives the process that started it, even one killed without cleanup.
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(3)


def _log(rank: int, msg: str) -> None:
    print(f"[rank {rank}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mlxdist.rank")
    p.add_argument("--model", required=True)
    p.add_argument("--split", required=True, help="layers per rank, e.g. 15,15")
    p.add_argument("--name", default=None, help="model name shown by the API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--backend", default="ring")
    args = p.parse_args(argv)
    args.split = [int(s) for s in args.split.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()

    import mlx.core as mx

    from quantize.memory import peak_rss

    from .pipeline import Runner
    from .stage import load_stage

    size = len(args.split)
    group = mx.distributed.init(strict=size > 1, backend=args.backend if size > 1 else "any")
    rank = group.rank()
    if group.size() != size:
        _log(rank, f"the split has {size} parts but the group has {group.size()} ranks")
        return 2
    base = peak_rss()
    t0 = time.perf_counter()
    stage = load_stage(args.model, args.split, rank)
    mx.clear_cache()
    held = stage.nbytes()
    peak = peak_rss()
    _log(
        rank,
        f"loaded layers {stage.start}-{stage.end - 1} from {args.model} "
        f"({held / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s; "
        f"peak rss {peak / 2**20:.1f} MiB (before weights {base / 2**20:.1f} MiB)",
    )
    # Every rank has loaded once this returns; rank 0 also learns the others' memory.
    figures = mx.array([[rank, base, peak, held]], dtype=mx.float32)
    if size > 1:
        figures = mx.distributed.all_gather(figures, group=group)
    mx.eval(figures)
    runner = Runner(stage, group)
    if rank != 0:
        runner.serve()
        return 0
    return _serve_api(args, runner, figures.tolist())


def _serve_api(args: argparse.Namespace, runner, figures: list) -> int:
    import uvicorn
    from mlx_lm.utils import load_tokenizer

    from .api import create_app
    from .coordinator import Coordinator

    stage = runner.stage
    tokenizer = load_tokenizer(args.model, eos_token_ids=stage.config.get("eos_token_id"))
    coordinator = Coordinator(runner, tokenizer, set(tokenizer.eos_token_ids))
    info = {
        "ranks": len(args.split),
        "split": args.split,
        "vocab_size": stage.vocab_size,
        "model_type": stage.config["model_type"],
        "memory": [
            {"rank": int(r), "before_weights": int(b), "peak_rss": int(p), "weights": int(w)}
            for r, b, p, w in figures
        ],
    }
    name = args.name or os.path.basename(os.path.normpath(args.model))
    app = create_app(coordinator, name, info)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _log(0, f"serving on http://{args.host}:{args.port}")
    try:
        coordinator.run()
    finally:
        server.should_exit = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
