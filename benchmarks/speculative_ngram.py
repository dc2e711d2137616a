"""Decode speed with speculative decoding by prompt lookup against without, on a code-editing
request: a short Python file, asked back with one change, so most of the answer repeats the
prompt.

`mlxdist serve --local N` runs once per rank count; each round sends the same greedy chat request
twice, with `"speculative": "ngram"` and with `"speculative": "none"` (a request's own setting),
alternating which goes first. The prefix cache serves both from the same prompt, so the figures
are decode only: the server's own decode tokens/s (usage), and the answers' texts compared.

    .venv/bin/python benchmarks/speculative_ngram.py [--model PATH] [--ranks 1,2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from serve_local import serve, stop  # noqa: E402

from mlxdist.cli.models import resolve_model  # noqa: E402

SOURCE = """def load_config(path):
    with open(path) as f:
        lines = f.read().splitlines()
    config = {}
    for line in lines:
        if not line or line.startswith("#"):
            continue
        key, value = line.split("=", 1)
        config[key.strip()] = value.strip()
    return config


def save_config(path, config):
    with open(path, "w") as f:
        for key, value in sorted(config.items()):
            f.write(f"{key} = {value}\\n")
"""
ASK = (
    "Here is a Python file:\n\n```python\n" + SOURCE + "```\n\nReturn the whole file, unchanged "
    "except that the function load_config is renamed read_config. Only the code."
)


def ask(url: str, mode: str, tokens: int, draft: int) -> dict:
    body = {
        "messages": [{"role": "user", "content": ASK}],
        "max_tokens": tokens,
        "temperature": 0.0,
        "speculative": mode,
        "draft_tokens": draft,
    }
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=1800)
    r.raise_for_status()
    out = r.json()
    return {"text": out["choices"][0]["message"]["content"], "usage": out["usage"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder or .gguf (default: demo model)")
    p.add_argument("--ranks", default="1,2", help="rank counts to run, e.g. 1,2")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--draft-tokens", type=int, default=6)
    args = p.parse_args()
    path = resolve_model(args.model)
    logs = Path(tempfile.mkdtemp(prefix="mlxdist-bench-"))
    print(f"model {path.name}, greedy, up to {args.tokens} tokens, {args.draft_tokens} drafts")
    print(
        f"{'ranks':>5} {'round':>5} {'mode':<6} {'decode tok/s':>13} {'accepted':>9} {'tokens':>7}"
    )
    for ranks in (int(n) for n in args.ranks.split(",")):
        proc, url = serve(path, ranks, [], logs / f"{ranks}.log")
        try:
            ask(url, "none", 4, args.draft_tokens)  # the prompt's prefill, cached from here on
            rates: dict[str, list[float]] = {"ngram": [], "none": []}
            texts: dict[str, set[str]] = {"ngram": set(), "none": set()}
            for i in range(args.rounds):
                order = ["ngram", "none"] if i % 2 == 0 else ["none", "ngram"]
                for mode in order:
                    r = ask(url, mode, args.tokens, args.draft_tokens)
                    usage = r["usage"]
                    spec = usage.get("speculative") or {}
                    rate = usage["decode_tokens_per_second"]
                    rates[mode].append(rate)
                    texts[mode].add(r["text"])
                    share = f"{spec['accepted']}/{spec['drafted']}" if spec else "-"
                    n = usage["completion_tokens"]
                    print(f"{ranks:>5} {i + 1:>5} {mode:<6} {rate:>13.2f} {share:>9} {n:>7}")
            ratio = statistics.median(rates["ngram"]) / statistics.median(rates["none"])
            same = texts["ngram"] == texts["none"] and len(texts["none"]) == 1
            print(f"{ranks} ranks: decode with prompt lookup / without {ratio:.2f} (target 1.5)")
            print(f"{ranks} ranks: the same text with and without: {'yes' if same else 'no'}")
        finally:
            stop(proc)
    print("answer:\n" + next(iter(texts["none"])))


if __name__ == "__main__":
    main()
