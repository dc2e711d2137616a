"""Through real ranks (2, pipeline): a family's chat answer, with its reasoning, is split by the
family's own format and ends at the family's end token, named in config.json or only in
generation_config.json.

The formats, and the families that share each (the start is read from the template's prompt):
- harmony channels, analysis to reasoning_content: gpt_oss;
- <think> opened by the prompt, so the output starts in the reasoning: deepseek_v32 and
  deepseek_v3 (R1-0528's template), minimax (MiniMax-M2);
- <think> the model may open itself, so the output starts in the answer: glm4_moe (GLM-4.5/4.6;
  with thinking off the prompt ends with an empty block), qwen3, qwen3_moe, kimi_k2 (K2
  Thinking); llama and mistral write no reasoning, so theirs is all answer.
One family per start runs here (each cluster start costs 10-20 s on this machine); real outputs of
every family are split in test_reasoning_formats.py.

A tiny random model writes no format, so each is driven to one: the embedding of each token of
the wanted answer (and of the prompt's last token) is made a large one-hot, which outweighs what
the random layers add, and lm_head scores the answer's next token on it. One mlx-lm process must
then write exactly that answer and end token; the cluster must stop at the end token (finish_reason
"stop"), and give, whole and streamed, the split the format's rules read off the answer
(expected_split, the rules the recorded outputs are checked by). A chain of one token to the next
cannot repeat a token, so gpt-oss writes one message, its final answer."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import local_cluster
from test_reasoning_formats import expected_split

pytestmark = pytest.mark.cluster

QUESTION = "What is the capital of France?"
GREEDY = 12
CONFIGS = ("config.json", "generation_config.json")


# (family, where its prompt leaves the output, the answer it is driven to write, its end token,
# the file naming that end token, as the real checkpoints do)
DRIVEN = [
    ("gpt_oss", "harmony", "<|channel|>final<|message|>Paris", "<|return|>", "config.json"),
    ("deepseek_v32", "think", "The capital</think>Paris", "<｜end▁of▁sentence｜>", "config.json"),
    ("glm4_moe", "answer", "<think>The capital</think>Paris", "<|user|>", "generation_config.json"),
]


def _drive(path, chain: list[int]) -> None:
    """Makes each token of chain but the last greedily followed by the next one."""
    import mlx.core as mx

    for file in sorted(path.glob("*.safetensors")):
        weights = mx.load(str(file))
        rows = {
            "model.embed_tokens.weight": (chain[:-1], 1000.0),
            "lm_head.weight": (chain[1:], 100.0),
        }
        for name in rows.keys() & weights.keys():
            tokens, scale = rows[name]
            matrix = weights[name].astype(mx.float32)
            for dim, token in enumerate(tokens):
                matrix[token] = mx.zeros(matrix.shape[1]).at[dim].add(scale)
            weights[name] = matrix.astype(weights[name].dtype)
        mx.save_safetensors(str(file), weights, metadata={"format": "pt"})


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


@pytest.mark.parametrize("family,start,answer,end,named_in", DRIVEN, ids=[d[0] for d in DRIVEN])
def test_chat_splits_by_format_and_stops_at_the_end_token(
    tmp_path, family, start, answer, end, named_in
):
    from mlx_lm.utils import load_tokenizer

    from mlxdist.serving.reasoning import reasoning_start
    from mlxdist.testing.make_model import make_model

    path = make_model(family, tmp_path / family)
    messages = [{"role": "user", "content": QUESTION}]
    tokenizer = load_tokenizer(path)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert reasoning_start(text) == start
    end_id = tokenizer.convert_tokens_to_ids(end)
    named = [json.loads((path / name).read_text())["eos_token_id"] for name in CONFIGS]
    in_config, in_generation = (end_id in ([i] if isinstance(i, int) else i) for i in named)
    assert (in_config, in_generation) == (named_in == "config.json", True)
    ids = tokenizer.encode(answer, add_special_tokens=False)
    chain = [tokenizer.encode(text, add_special_tokens=False)[-1], *ids, end_id]
    assert len(set(chain)) == len(chain)
    _drive(path, chain)
    tokens, _ = _greedy(path, text)
    assert tokens[: len(ids) + 1] == [*ids, end_id]  # one mlx-lm process writes the answer
    expected = expected_split(start, answer)

    body = {"messages": messages, "max_tokens": GREEDY, "temperature": 0.0}
    with local_cluster(path, [2, 2]) as (url, _):
        whole = httpx.post(url + "/v1/chat/completions", json=body, timeout=300).json()
        deltas = []
        stream = body | {"stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=stream, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    deltas.append(json.loads(line[6:])["choices"][0])
    print(f"{family}: {answer!r} then {end} ({named_in}): split {expected}")
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens"] == len(ids)
    message = choice["message"]
    assert (message["reasoning_content"] or "", message["content"]) == expected
    streamed_reasoning = "".join(d["delta"].get("reasoning_content", "") for d in deltas)
    streamed_content = "".join(d["delta"].get("content") or "" for d in deltas)
    assert (streamed_reasoning, streamed_content) == expected
    assert deltas[-1]["finish_reason"] == "stop"
