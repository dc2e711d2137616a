"""Decode tokens/s of `mlxdist launch --local 1` against mlx-lm's own stream_generate.

Same model, prompt, greedy sampling and token count, in one run, alternating the two so that
machine noise falls on both; prints each round and the ratio of the medians.

    .venv/bin/python benchmarks/decode_vs_mlx_lm.py [--model PATH] [--tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_sampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from launcher.local import start_local, wait_ready  # noqa: E402
from mlxdist.cli.models import resolve_model  # noqa: E402
from quantize.checkpoint import inspect_model  # noqa: E402

PROMPT = "Write a long story about a dragon who learns to bake bread."


def rate(stamps: list[float]) -> float:
    """Decode tokens/s: tokens after the first over the time they took."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def mlx_lm_round(model, tokenizer, prompt: list[int], tokens: int) -> tuple[float, int]:
    stamps = []
    sampler = make_sampler(0.0)
    for _ in stream_generate(model, tokenizer, mx.array(prompt), tokens, sampler=sampler):
        stamps.append(time.perf_counter())
    return rate(stamps), len(stamps)


def mlxdist_round(url: str, prompt: list[int], tokens: int) -> tuple[float, int]:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0.0, "stream": True}
    body["return_token_ids"] = True  # one event per token, even where the text is empty
    stamps = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                if choice.get("token_ids"):
                    stamps.append(time.perf_counter())
    return rate(stamps), len(stamps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder or .gguf (default: demo model)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    path = resolve_model(args.model)
    model, tokenizer = load(str(path))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer.encode(text, add_special_tokens=False)

    cluster = start_local(path, [inspect_model(path).num_layers])
    try:
        wait_ready(cluster)
        mlxdist_round(cluster.url, prompt, 8)  # warm-up
        mlx_lm_round(model, tokenizer, prompt, 8)
        ours, theirs = [], []
        print(f"model {path.name}, prompt {len(prompt)} tokens, up to {args.tokens} tokens")
        print(f"{'round':>5} {'mlx-lm tok/s':>13} {'mlxdist tok/s':>14} {'tokens':>7}")
        for i in range(args.rounds):
            t, n1 = mlx_lm_round(model, tokenizer, prompt, args.tokens)
            o, n2 = mlxdist_round(cluster.url, prompt, args.tokens)
            theirs.append(t)
            ours.append(o)
            print(f"{i + 1:>5} {t:>13.2f} {o:>14.2f} {n1:>3}/{n2:<3}")
        ratio = statistics.median(ours) / statistics.median(theirs)
        print(
            f"median: mlx-lm {statistics.median(theirs):.2f}, mlxdist {statistics.median(ours):.2f}"
        )
        print(f"ratio mlxdist / mlx-lm: {ratio:.3f} (target >= 0.95)")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
