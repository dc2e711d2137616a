"""Greedy answers of the demo model under each schema of mlxdist/testing/schemas.py, in one
process: how many tokens each takes, and whether it validates (what the table's docstring says
of SmolLM2). About 10 minutes on a slow CPU.

    .venv/bin/python benchmarks/grammar_answers.py [--model PATH] [--max-tokens 300]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jsonschema
import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlxdist.cli.models import resolve_model  # noqa: E402
from mlxdist.runtime.grammar import GrammarMask  # noqa: E402
from mlxdist.serving.grammar import json_grammar  # noqa: E402
from mlxdist.testing.schemas import SCHEMAS  # noqa: E402


def answer(model, tokenizer, schema: dict | None, max_tokens: int) -> list[int]:
    ask = "Reply with a JSON object."
    if schema is not None:
        ask = f"Reply with a JSON object for this schema: {json.dumps(schema)}"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": ask}], add_generation_prompt=True
    )
    cache = make_prompt_cache(model)
    mask = GrammarMask(tokenizer, json_grammar(schema), model.args.vocab_size)
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    tokens: list[int] = []
    while len(tokens) < max_tokens:
        token = int(mx.argmax(mask.apply(logits), axis=-1).item())
        if token in tokenizer.eos_token_ids:
            break
        mask.accept(token)
        tokens.append(token)
        logits = model(mx.array([[token]]), cache=cache)[:, -1]
    return tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder or .gguf (default: demo model)")
    p.add_argument("--max-tokens", type=int, default=300)
    args = p.parse_args()
    model, tokenizer = load(str(resolve_model(args.model)))
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    for name, schema in SCHEMAS:
        tokens = answer(model, tokenizer, schema, args.max_tokens)
        text = tokenizer.decode(tokens)
        validator = jsonschema.Draft202012Validator(
            schema or {"type": "object"}, format_checker=checker
        )
        try:
            validator.validate(json.loads(text))
            verdict = "valid"
        except (ValueError, jsonschema.ValidationError) as e:
            verdict = f"not valid: {str(e).splitlines()[0][:60]}"
        print(f"{name:30} {len(tokens):4} {verdict:12} {text[:100]!r}", flush=True)


if __name__ == "__main__":
    main()
