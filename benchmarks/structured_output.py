"""What a JSON schema costs decode speed: SmolLM2-135M on 2 pipeline ranks (`serve --local 2`),
the same question answered under a schema and without one, for as many tokens.

The schema's answer is long on purpose (an array of 12 short strings, about 60-90 tokens), so
that decode dominates. The plain answer then decodes exactly that many tokens (`ignore_eos`).
Each round asks both, alternating which goes first; the figure is the median ratio of the
usage's decode tokens/s (grammar / plain). The grammar's mask is computed on the last rank, one
step ahead on a worker thread, and applied before its sampler draws.

Also reported: the same with log probabilities (top 5) asked for, whose values travel back
with each token.

    .venv/bin/python benchmarks/structured_output.py [--rounds 5] [--ranks 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from serve_local import serve, stop  # noqa: E402

from quantize.gguf import default_smollm2_gguf, import_gguf  # noqa: E402

QUESTION = [{"role": "user", "content": "List twelve fruits as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "fruits": {
            "type": "array",
            "items": {"type": "string", "maxLength": 12},
            "minItems": 12,
            "maxItems": 12,
        }
    },
    "required": ["fruits"],
    "additionalProperties": False,
}


def ask(url: str, extra: dict) -> dict:
    body = {"messages": QUESTION, "temperature": 0.0, "max_tokens": 400, **extra}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="structured-"))
    model = import_gguf(default_smollm2_gguf(), work / "smollm2")
    proc, url = serve(model, args.ranks, ["--prompt-cache-bytes", "0"], work / "serve.log")
    schema = {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}
    try:
        ask(url, {"max_tokens": 8})  # warm up
        ratios, lp_ratios, lengths = [], [], []
        for i in range(args.rounds):
            constrained = ask(url, schema)
            n = constrained["usage"]["completion_tokens"]
            json.loads(constrained["choices"][0]["message"]["content"])  # it parses
            plain_extra = {"max_tokens": n, "ignore_eos": True}
            runs = [("plain", plain_extra), ("logprobs", plain_extra | {"logprobs": True})]
            rates = {"grammar": constrained["usage"]["decode_tokens_per_second"]}
            # the schema's answer comes first (it sets the length), then again after the others
            for name, extra in runs if i % 2 == 0 else runs[::-1]:
                extra = extra | ({"top_logprobs": 5} if "logprobs" in extra else {})
                answer = ask(url, extra)
                assert answer["usage"]["completion_tokens"] == n
                rates[name] = answer["usage"]["decode_tokens_per_second"]
            again = ask(url, schema)  # and after them, so neither order favours one side
            rates["grammar"] = (rates["grammar"] + again["usage"]["decode_tokens_per_second"]) / 2
            ratios.append(rates["grammar"] / rates["plain"])
            lp_ratios.append(rates["logprobs"] / rates["plain"])
            lengths.append(n)
            print(
                f"round {i + 1}: {n} tokens; decode tokens/s plain {rates['plain']:.2f}, "
                f"json_schema {rates['grammar']:.2f}, logprobs(top 5) {rates['logprobs']:.2f}",
                flush=True,
            )
        print(
            f"\n{args.ranks} pipeline ranks, SmolLM2-135M, {args.rounds} rounds "
            f"({min(lengths)}-{max(lengths)} tokens an answer):\n"
            f"  json_schema / plain decode speed: median {statistics.median(ratios):.3f} "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f})\n"
            f"  logprobs (top 5) / plain:         median {statistics.median(lp_ratios):.3f}"
        )
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
