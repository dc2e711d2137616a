"""Speculative decoding with R1's MTP layer on a fitted tiny-r1: acceptance, and decode tokens/s
with and without, on 2 pipeline ranks and in expert mode (2 ranks).

Two copies of one tiny-r1 (`mlxdist testing make-r1`) differ only in their MTP layer: one as
generated (random, so its drafts are nearly always rejected), one fitted to the model's own
continuations (`mlxdist testing fit-mtp`). Both run as R1's own format (FP8 read to float32 on
this CPU): in bfloat16 a step over two positions rounds differently from one, and a random
model's top logits are close enough for that to change greedy answers (docs/usage.md).
With the random layer every pass yields one token, so its speed against plain decoding is the
cost of a pass in plain steps; `launcher.specmodel.break_even` turns that cost into the acceptance
speculation needs to pay. The fitted layer then shows its acceptance and its speed-up, which
should be above 1.0 exactly when its acceptance is above that break-even.

A third copy's layer repeats the token just chosen (mlxdist/testing/repeat_mtp.py), asked with
the prompts whose greedy answers repeat tokens most: acceptance on the other side of the
break-even, to check the prediction there too (its pass costs what the others' do: the same
model, and a layer of the same shape).

The prompts are random token ids (seeded), not any prompt the layer was fitted on. Each round
sends every prompt greedy with `"speculative": "mtp"` and `"none"` (a request's own setting),
alternating which goes first; answers must be the same tokens.

    .venv/bin/python benchmarks/speculative_mtp.py [--modes pipeline,expert] [--rounds 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from serve_local import serve, stop  # noqa: E402

from launcher.specmodel import break_even, tokens_per_pass  # noqa: E402

PRESET_SETS = ["--set", "num_hidden_layers=8"]  # a deeper tiny-r1: a step worth saving


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mlxdist.cli", *args], cwd=ROOT, check=True)


def build(work: Path, fit_steps: int) -> tuple[Path, Path]:
    """(random MTP, fitted MTP): the same tiny-r1 but for its MTP layer."""
    raw, fitted = work / "tiny-r1", work / "tiny-r1-fitted"
    cli("testing", "make-r1", str(raw), *PRESET_SETS)
    cli("testing", "make-r1", str(fitted), *PRESET_SETS)
    cli("testing", "fit-mtp", str(fitted), "--steps", str(fit_steps), "--sequences", "112")
    return raw, fitted


def repeating_prompts(path: Path, count: int, tokens: int) -> list[list[int]]:
    """Of 24 random prompts, the count whose greedy answers repeat a token most often."""
    import mlx.core as mx

    from mlxdist.runtime.stage import load_stage
    from quantize.checkpoint import read_config

    stage = load_stage(path, [read_config(path)["num_hidden_layers"]], 0)
    rng = random.Random(1)
    scored = []
    for _ in range(24):
        prompt = [rng.randrange(3, stage.vocab_size) for _ in range(24)]
        cache, out = stage.make_cache(), []
        h = stage.forward(stage.embed(mx.array([prompt])), cache)
        for _ in range(tokens):
            out.append(int(mx.argmax(stage.logits(h[:, -1, :])).item()))
            h = stage.forward(stage.embed(mx.array([out[-1:]])), cache)
        scored.append((sum(a == b for a, b in zip(out, out[1:])), prompt))
    scored.sort(key=lambda s: -s[0])
    return [p for _, p in scored[:count]]


def ask(url: str, prompt: list[int], mode: str, tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0.0, "ignore_eos": True}
    body |= {"speculative": mode, "return_token_ids": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=1800)
    r.raise_for_status()
    out = r.json()
    return {"ids": out["choices"][0]["token_ids"], "usage": out["usage"]}


def measure(path: Path, mode: str, prompts: list, args, log: Path) -> dict:
    """Median decode tokens/s with and without, acceptance, and whether the answers agree."""
    extra = ["--speculative", "mtp", "--draft-tokens", str(args.draft_tokens)]
    # no prefix cache: a prompt read from it starts the MTP layer's cache empty, which would
    # lower the acceptance of whichever mode asked second
    extra += ["--prompt-cache-bytes", "0"]
    if mode != "pipeline":
        extra += ["--parallel", mode]
    proc, url = serve(path, 2, extra, log)
    try:
        rates: dict[str, list[float]] = {"mtp": [], "none": []}
        answers: dict[str, list] = {"mtp": [], "none": []}
        drafted = accepted = 0
        ask(url, prompts[0], "none", 4)  # warm-up
        for i in range(args.rounds):
            for prompt in prompts:
                for m in ["mtp", "none"] if i % 2 == 0 else ["none", "mtp"]:
                    r = ask(url, prompt, m, args.tokens)
                    rates[m].append(r["usage"]["decode_tokens_per_second"])
                    answers[m].append(r["ids"])
                    spec = r["usage"].get("speculative") or {}
                    drafted += spec.get("drafted", 0)
                    accepted += spec.get("accepted", 0)
    finally:
        stop(proc)
    ratio = statistics.median(rates["mtp"]) / statistics.median(rates["none"])
    return {
        "ratio": ratio,
        "acceptance": accepted / drafted if drafted else 0.0,
        "same": answers["mtp"] == answers["none"],
        "plain": statistics.median(rates["none"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="pipeline,expert")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--draft-tokens", type=int, default=1)
    p.add_argument("--fit-steps", type=int, default=240)
    p.add_argument("--work", type=Path, default=None, help="reuse models built here")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mlxdist-mtp-"))
    if (work / "tiny-r1-fitted").is_dir():
        random_mtp, fitted = work / "tiny-r1", work / "tiny-r1-fitted"
    else:
        random_mtp, fitted = build(work, args.fit_steps)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 1000) for _ in range(24)] for _ in range(args.prompts)]
    k = args.draft_tokens
    print(f"tiny-r1 ({' '.join(PRESET_SETS[1::2])}), float32, greedy, {args.tokens} tokens, k={k}")
    print(
        f"{'mode':<9} {'plain tok/s':>11} {'pass cost':>9} {'break-even':>10} "
        f"{'acceptance':>10} {'speed-up':>8} {'predicted':>9} {'same':>5}"
    )
    rows = []
    for mode in args.modes.split(","):
        cold = measure(random_mtp, mode, prompts, args, work / f"{mode}-random.log")
        # with (nearly) every draft rejected, a pass yields 1 + a + ... tokens for its cost
        cost = tokens_per_pass(cold["acceptance"], k) / cold["ratio"]
        even = break_even(cost, k)
        hot = measure(fitted, mode, prompts, args, work / f"{mode}-fitted.log")
        predicted = tokens_per_pass(hot["acceptance"], k) / cost
        even_text = f"{even:.2f}" if even is not None else "never"
        same = "yes" if cold["same"] and hot["same"] else "NO"
        print(
            f"{mode:<9} {hot['plain']:>11.2f} {cost:>9.2f} {even_text:>10} "
            f"{hot['acceptance']:>10.2f} {hot['ratio']:>8.2f} {predicted:>9.2f} {same:>5}"
        )
        rows.append((mode, cost, even_text))
    repeat = work / "tiny-r1-repeat"
    if not repeat.is_dir():
        from mlxdist.testing.repeat_mtp import repeat_mtp

        repeat_mtp(random_mtp, repeat)
    chosen = repeating_prompts(repeat, args.prompts, args.tokens)
    for mode, cost, even_text in rows:
        hot = measure(repeat, mode, chosen, args, work / f"{mode}-repeat.log")
        predicted = tokens_per_pass(hot["acceptance"], k) / cost
        same = "yes" if hot["same"] else "NO"
        print(
            f"{mode + ' (repeat layer)':<9} {hot['plain']:>11.2f} {cost:>9.2f} {even_text:>10} "
            f"{hot['acceptance']:>10.2f} {hot['ratio']:>8.2f} {predicted:>9.2f} {same:>5}"
        )
    print(f"models in {work}")


if __name__ == "__main__":
    main()
