"""Decode tokens/s of each family's tiny model on 2 local ranks (pipeline) against one mlx-lm
process on the same folder.

Each family's checkpoint is made by `mlxdist testing make-model`; both sides decode the same
greedy tokens from the same chat prompt, past end-of-sequence, for --tokens tokens; one run each
(mlx-lm first, then mlxdist), the ratio printed per family.

    .venv/bin/python benchmarks/families_vs_mlx_lm.py [--tokens 128] [--families llama,qwen3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_sampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from launcher.local import start_local, wait_ready  # noqa: E402
from mlxdist.runtime.stage import run_dtype  # noqa: E402
from mlxdist.testing.families import family_names  # noqa: E402
from mlxdist.testing.make_model import make_model  # noqa: E402

PROMPT = "Write a long story about a dragon who learns to bake bread."


def rate(stamps: list[float]) -> float:
    """Decode tokens/s: tokens after the first over the time they took."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def mlx_lm_run(model, tokenizer, prompt: list[int], tokens: int) -> tuple[float, int]:
    stamps = []
    sampler = make_sampler(0.0)
    for _ in stream_generate(model, tokenizer, mx.array(prompt), tokens, sampler=sampler):
        stamps.append(time.perf_counter())
    return rate(stamps), len(stamps)


def mlxdist_run(url: str, prompt: list[int], tokens: int) -> tuple[float, int]:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0.0, "stream": True}
    body |= {"return_token_ids": True, "ignore_eos": True}  # one event per token
    stamps = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                if json.loads(line[6:])["choices"][0].get("token_ids"):
                    stamps.append(time.perf_counter())
    return rate(stamps), len(stamps)


def one_family(name: str, folder: Path, tokens: int) -> tuple[float, float, int, int]:
    path = make_model(name, folder / name)
    model, tokenizer = load(str(path))
    if (dtype := run_dtype(json.loads((path / "config.json").read_text()))) is not None:
        model.set_dtype(dtype)  # as every rank runs it
    tokenizer.eos_token_ids = set()  # decode `tokens` tokens, as mlxdist's ignore_eos
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer.encode(text, add_special_tokens=False)
    mlx_lm_run(model, tokenizer, prompt, 8)  # warm-up
    theirs, n1 = mlx_lm_run(model, tokenizer, prompt, tokens)
    del model
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    cluster = start_local(path, [layers // 2, layers - layers // 2])
    try:
        wait_ready(cluster, timeout=300)
        mlxdist_run(cluster.url, prompt, 8)  # warm-up
        ours, n2 = mlxdist_run(cluster.url, prompt, tokens)
    finally:
        cluster.stop()
    return theirs, ours, n1, n2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--families", default=",".join(family_names()))
    args = p.parse_args()
    print(f"2 ranks (pipeline, --local 2) vs one mlx-lm process, {args.tokens} tokens, one run")
    print(f"{'family':<14} {'mlx-lm tok/s':>13} {'mlxdist tok/s':>14} {'ratio':>6} {'tokens':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.families.split(","):
            theirs, ours, n1, n2 = one_family(name, Path(tmp), args.tokens)
            print(
                f"{name:<14} {theirs:>13.1f} {ours:>14.1f} {ours / theirs:>6.3f} {n1:>4}/{n2:<4}",
                flush=True,
            )


if __name__ == "__main__":
    main()
