"""Through real ranks (2, pipeline): a family's chat answer is split by its own reasoning format
and ends at an end token that only generation_config.json names.

The tiny random models cannot be taught to write a format, so each test takes what they write:
one mlx-lm process's greedy tokens for the chat prompt, past any end token. A later one of those
tokens is added to generation_config.json's end tokens; the cluster must stop just before it
(finish_reason "stop"), and its reasoning_content and content, whole and streamed, must be that
text split as the family's chat prompt says (R1 opens <think> in the prompt, so it is all
reasoning; gpt-oss's prompt ends at a harmony header)."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import local_cluster

pytestmark = pytest.mark.cluster

QUESTION = "What is the capital of France?"
GREEDY = 12


def _greedy(path, text: str) -> tuple[list[int], object]:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from mlxdist.runtime.stage import run_dtype

    model, tokenizer = load(str(path))
    if (dtype := run_dtype(json.loads((path / "config.json").read_text()))) is not None:
        model.set_dtype(dtype)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    tokens = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=GREEDY)]
    return tokens, tokenizer


@pytest.mark.parametrize("family,start", [("gpt_oss", "harmony"), ("deepseek_v32", "think")])
def test_chat_splits_by_format_and_stops_at_generation_config_end(tmp_path, family, start):
    from mlx_lm.utils import load_tokenizer

    from mlxdist.serving.reasoning import make_splitter, reasoning_start
    from mlxdist.testing.make_model import make_model

    path = make_model(family, tmp_path / family)
    messages = [{"role": "user", "content": QUESTION}]
    text = load_tokenizer(path).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert reasoning_start(text) == start
    tokens, tokenizer = _greedy(path, text)
    generation_file = path / "generation_config.json"
    generation = json.loads(generation_file.read_text())
    ends = set(generation["eos_token_id"])
    # The first token from the third on that is new and no end token yet: the new end token.
    n = next(
        i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i] and tokens[i] not in ends
    )
    n = min(n, next((i for i, t in enumerate(tokens) if t in ends), n))
    generation["eos_token_id"].append(tokens[n])
    generation_file.write_text(json.dumps(generation))
    detokenizer = tokenizer.detokenizer  # as the server decodes (it trims a leading space)
    for t in tokens[:n]:
        detokenizer.add_token(t)
    detokenizer.finalize()
    splitter = make_splitter(start)
    pieces = [splitter.feed(detokenizer.text), splitter.finish()]
    expected = ("".join(r for r, _ in pieces), "".join(c for _, c in pieces))

    body = {"messages": messages, "max_tokens": GREEDY, "temperature": 0.0}
    with local_cluster(path, [2, 2]) as (url, _):
        whole = httpx.post(url + "/v1/chat/completions", json=body, timeout=300).json()
        deltas = []
        stream = body | {"stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=stream, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    deltas.append(json.loads(line[6:])["choices"][0])
    print(f"{family}: {n} tokens, then end token {tokens[n]}; split {expected}")
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens"] == n
    message = choice["message"]
    assert (message["reasoning_content"] or "", message["content"]) == expected
    streamed_reasoning = "".join(d["delta"].get("reasoning_content", "") for d in deltas)
    streamed_content = "".join(d["delta"].get("content") or "" for d in deltas)
    assert (streamed_reasoning, streamed_content) == expected
    assert deltas[-1]["finish_reason"] == "stop"
