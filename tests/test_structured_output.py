"""Structured output and sampling extras through a real pipeline: SmolLM2 on 2 ranks (the session's
shared cluster), where the last rank samples, so the grammar's mask, the bias, the penalties and
the log probabilities are all computed there and travel back with each token.

- json_schema: every answer to 30+ schemas (nested objects, arrays, enums, required fields,
  bounds), asked concurrently with the official openai client, parses and validates.
- logprobs / top_logprobs: equal to the log-softmax of one mlx-lm process's logits within 1e-4.
- logit_bias and the penalties: the answer is that process's under mlx-lm's own processors.
"""

from __future__ import annotations

import json
import threading

import httpx
import jsonschema
import pytest
from sampling_reference import assert_logprobs_match, cluster_answer, mlx_lm_answer

from mlxdist.testing.schemas import SCHEMAS

pytestmark = pytest.mark.cluster

QUESTION = "Describe a person called Ada as JSON."
# The schemas whose answers SmolLM2 makes longest (40-55 tokens: a free object, a date and a
# uuid, a list of objects) stay in the unit tests only, to keep this test's decoding short.
LONG = {"any_object", "string_formats", "array_of_objects"}
CLUSTER_SCHEMAS = [(name, schema) for name, schema in SCHEMAS if name not in LONG]


@pytest.fixture(scope="module")
def smollm2_model(smollm2):
    from mlx_lm import load

    model, tokenizer = load(str(smollm2))
    return model, tokenizer


def _response_format(name: str, schema: dict | None) -> dict:
    if schema is None:
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_every_json_schema_answer_validates(shared_smollm2):
    from openai import OpenAI

    url, _, _ = shared_smollm2
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    answers: dict[str, str] = {}
    lengths: dict[str, int] = {}
    errors: dict[str, str] = {}

    def ask(chunk: list[tuple[str, dict | None]]) -> None:
        for name, schema in chunk:
            try:
                r = client.chat.completions.create(
                    model="",
                    messages=[{"role": "user", "content": QUESTION}],
                    response_format=_response_format(name, schema),
                    max_tokens=300,
                    temperature=0.0,
                )
                answers[name] = r.choices[0].message.content
                lengths[name] = r.usage.completion_tokens
                assert r.choices[0].finish_reason == "stop", (name, answers[name])
            except Exception as e:  # reported below, with the schema's name
                errors[name] = f"{type(e).__name__}: {e}"

    assert len(CLUSTER_SCHEMAS) >= 30
    lanes = 4  # concurrent answers: the pipeline interleaves them
    threads = [
        threading.Thread(target=ask, args=(CLUSTER_SCHEMAS[i::lanes],)) for i in range(lanes)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    print(f"{sum(lengths.values())} tokens in {len(lengths)} answers")
    assert not errors, errors
    for name, schema in CLUSTER_SCHEMAS:
        value = json.loads(answers[name])
        print(f"{name} ({lengths[name]} tokens): {answers[name]}")
        jsonschema.validate(value, schema if schema is not None else {"type": "object"})


def test_chat_logprobs_equal_mlx_lm(shared_smollm2, smollm2_model):
    url, _, _ = shared_smollm2
    model, tokenizer = smollm2_model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    body = {"messages": messages, "max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
    body |= {"logprobs": True, "top_logprobs": 4, "return_token_ids": True}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    expected, rows = mlx_lm_answer(model, prompt, 6, {})
    assert choice["token_ids"] == expected
    content = choice["logprobs"]["content"]
    as_completion = {
        "token_ids": choice["token_ids"],
        "logprobs": {
            "token_logprobs": [c["logprob"] for c in content],
            "top_logprobs": [
                {t["token"]: t["logprob"] for t in c["top_logprobs"]} for c in content
            ],
        },
    }
    assert_logprobs_match(as_completion, rows, 4)
    assert [c["token"] for c in content] == [tokenizer.decode([t]) for t in expected]


# (prompt ids, tokens, extras) through the pipeline's last rank
EXTRAS = [
    ([1, 9690, 198, 504], 6, {"logprobs": 5}),
    ([1, 9690, 198, 504], 8, {"repetition_penalty": 1.4, "frequency_penalty": 0.8}),
    ([1, 9690, 198, 504], 5, {"logit_bias": {"504": 100.0}, "presence_penalty": 0.3}),
]


@pytest.mark.parametrize("prompt,n,extras", EXTRAS)
def test_completion_extras_equal_mlx_lm(shared_smollm2, smollm2_model, prompt, n, extras):
    url, _, _ = shared_smollm2
    model, _ = smollm2_model
    choice = cluster_answer(url, prompt, n, extras)
    expected, rows = mlx_lm_answer(model, prompt, n, extras)
    print(f"{extras}: {choice['token_ids']} (mlx-lm {expected})")
    assert choice["token_ids"] == expected
    if "logprobs" in extras:
        assert_logprobs_match(choice, rows, extras["logprobs"])
    if "logit_bias" in extras:
        assert expected == [504] * n
