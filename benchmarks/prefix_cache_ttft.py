"""Time to first token of a conversation's follow-up turn, with the prefix cache and without.

`mlxdist serve --local RANKS` runs twice on the same model, one server after the other (so they
do not share the CPU): as it starts by default (the prefix cache on) and with
`--prompt-cache-bytes 0`. Each round streams a conversation of about 400 prompt tokens (a long
first message, a short answer) and then its follow-up turn (the answer and a new question), both
greedy, and times the follow-up at the client, from sending it to the first text. Each round
opens with different text, so no round starts from another's entries.

    .venv/bin/python benchmarks/prefix_cache_ttft.py [--model PATH] [--ranks 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from serve_local import serve, stop  # noqa: E402

from mlxdist.cli.models import resolve_model  # noqa: E402

# About 330 tokens of SmolLM2's tokenizer with the chat template around it: the first message.
FACTS = (
    "Here are my notes on the project, please keep them in mind. The cluster has six machines "
    "joined by cables in a ring. Each machine holds a part of the model's layers, and the first "
    "machine also runs the server that answers requests. The planner decides how many layers "
    "each machine holds, from the memory each one has and the memory the model needs. When a "
    "machine fails, the others notice within seconds and the server tells every client whose "
    "answer was cut short which machine failed. The quantiser turns the released weights into "
    "four-bit weights with some layers kept at six bits, and writes one folder per machine. "
)
ANSWER_TOKENS = 16


def opening(round_: int) -> str:
    return f"Round {round_}: a different day of notes. " + FACTS * 3 + "Summarise the notes."


def stream(url: str, messages: list[dict]) -> tuple[float, str, dict]:
    """(seconds to the first text, the answer, usage) of one streamed greedy chat request."""
    body = {
        "messages": messages,
        "max_tokens": ANSWER_TOKENS,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent, first, text, usage = time.perf_counter(), None, [], {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    first = first or time.perf_counter()
                    text.append(choice["delta"]["content"])
    return (first or time.perf_counter()) - sent, "".join(text), usage


def rounds(url: str, count: int, first_round: int) -> list[dict]:
    out = []
    for i in range(first_round, first_round + count):
        messages = [{"role": "user", "content": opening(i)}]
        cold, answer, usage1 = stream(url, messages)
        messages += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "Which machine runs the server?"},
        ]
        follow, answer2, usage2 = stream(url, messages)
        cached = (usage2.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        out.append(
            {
                "first_ttft": cold,
                "follow_ttft": follow,
                "prompt_tokens": usage2.get("prompt_tokens"),
                "cached_tokens": cached,
                "answer": answer2,
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder or .gguf (default: demo model)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    path = resolve_model(args.model)
    logs = Path(tempfile.mkdtemp(prefix="mlxdist-bench-"))
    results = {}
    for name, extra in (("cache on", []), ("cache off", ["--prompt-cache-bytes", "0"])):
        proc, url = serve(path, args.ranks, extra, logs / f"{name}.log")
        try:
            stream(url, [{"role": "user", "content": "Hello"}])  # warm-up
            results[name] = rounds(url, args.rounds, 1)
        finally:
            stop(proc)
    print(f"model {path.name}, {args.ranks} ranks, greedy, {ANSWER_TOKENS}-token answers")
    print(
        f"{'server':<10} {'round':>5} {'prompt':>7} {'cached':>7} {'turn 1 s':>9} {'turn 2 s':>9}"
    )
    for name, rs in results.items():
        for i, r in enumerate(rs, 1):
            print(
                f"{name:<10} {i:>5} {r['prompt_tokens']:>7} {r['cached_tokens']:>7} "
                f"{r['first_ttft']:>9.3f} {r['follow_ttft']:>9.3f}"
            )
    on = statistics.median(r["follow_ttft"] for r in results["cache on"])
    off = statistics.median(r["follow_ttft"] for r in results["cache off"])
    same = [a["answer"] for a in results["cache on"]] == [b["answer"] for b in results["cache off"]]
    print(f"follow-up TTFT with the cache / without: {on / off:.3f} (target at most 0.25)")
    print(f"same answers with and without: {'yes' if same else 'no'}")


if __name__ == "__main__":
    main()
