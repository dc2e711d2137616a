"""Tool calls, log probabilities and the new sampling fields of the OpenAI API.

Pure: the messages and tools as the chat template takes them, an answer's calls split out of
R1-0528's tokens whole and streamed. In-process (TestClient, a fake runner, tiny-r1's and
SmolLM2's real tokenizers): each refusal is a 400 in OpenAI's shape. Through real ranks
(tiny-r1 on 2, the official openai client): a tool round trip forced by tool_choice, whole and
streamed; log probabilities against the model's own logits; logit_bias; a JSON schema.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading

import httpx
import jsonschema
import pytest
from fakes import FakeRunner
from fastapi.testclient import TestClient
from mlx_lm.utils import load_tokenizer

from mlxdist.serving.answer import Answer
from mlxdist.serving.api import create_app
from mlxdist.serving.api.chat_render import arguments_as_dict, template_messages
from mlxdist.serving.api.openai_output import Output
from mlxdist.serving.api.openai_schema import ChatRequest
from mlxdist.serving.coordinator import Coordinator
from mlxdist.serving.events import Done
from mlxdist.testing import tiny_r1 as r1

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}


def r1_call(name: str, arguments: str) -> str:
    # R1-0528's call, as its chat template writes one back (deepseek-ai/DeepSeek-R1-0528,
    # tokenizer_config.json's chat_template)
    return f"{r1.CALL_BEGIN}function{r1.TOOL_SEP}{name}\n```json\n{arguments}\n```{r1.CALL_END}"


TWO_CALLS = (
    "Let me look."
    + r1.CALLS_BEGIN
    + r1_call("get_weather", '{"city": "Paris"}')
    + "\n"
    + r1_call("get_time", "{}")
    + r1.CALLS_END
)


# ---------------------------------------------------------------- pure


def test_arguments_go_as_text_to_templates_that_join_them_and_as_a_dict_to_the_rest():
    r1_0528 = "{{ '<｜tool▁sep｜>' + tool['function']['arguments'] + '\\n```' }}"
    qwen3 = "{%- if tool_call.arguments is string %}{{ tool_call.arguments }}{%- else %}"
    llama31 = "{{- '{\"parameters\": ' }}{{- tool_call.arguments | tojson }}"
    assert not arguments_as_dict(r1_0528) and not arguments_as_dict(qwen3)
    assert not arguments_as_dict(r1.CHAT_TEMPLATE)
    assert arguments_as_dict(llama31) and arguments_as_dict(None)


def test_a_tool_round_trip_renders_through_tiny_r1s_template(tiny_r1):
    tokenizer = load_tokenizer(tiny_r1)
    req = ChatRequest.model_validate(
        {
            "messages": [
                QUESTION,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
            ]
        }
    )
    messages = template_messages(req.messages, arguments_as_dict(tokenizer.chat_template))
    text = tokenizer.apply_chat_template(
        messages, tools=[WEATHER], add_generation_prompt=True, tokenize=False
    )
    assert "### get_weather" in text  # the tools, in the system prompt
    call = r1_call("get_weather", '{"city":"Paris"}')
    assert r1.CALLS_BEGIN + call + r1.CALLS_END in text  # the arguments as they were sent
    assert text.endswith(
        r1.OUTPUTS_BEGIN + r1.OUTPUT_BEGIN + "sunny, 21 C" + r1.OUTPUT_END + r1.OUTPUTS_END
    )
    # as a dict, the arguments go through the template's tojson
    as_dict = template_messages(req.messages, True)[1]["tool_calls"][0]["function"]
    assert as_dict["arguments"] == {"city": "Paris"}


def done(text: str = "", reason: str = "stop") -> Done:
    return Done(text, reason, [], 3, 4, 0.0, 0.1, 10.0)


def output(stream: bool, fmt: str | None = "deepseek_r1") -> Output:
    req = ChatRequest.model_validate({"messages": [QUESTION], "stream": stream})
    return Output(req, "tiny-r1", True, Answer("answer", fmt, [WEATHER]))


def test_calls_split_out_whole_and_streamed_piece_by_piece_alike():
    whole = output(False).whole(done(TWO_CALLS))
    [choice] = whole["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Let me look."
    calls = [
        (c["type"], c["function"]["name"], c["function"]["arguments"])
        for c in message["tool_calls"]
    ]
    assert calls == [
        ("function", "get_weather", '{"city": "Paris"}'),
        ("function", "get_time", "{}"),
    ]
    assert all(c["id"].startswith("call_") for c in message["tool_calls"])
    for size in (1, 3, 7):  # every cut, markers split across pieces included
        out = output(True)
        chunks = []
        for i in range(0, len(TWO_CALLS), size):
            chunks += out.deltas(out.answer.feed(TWO_CALLS[i : i + size]))
        chunks += out.deltas(out.tail(done()))
        chunks.append(out.chunk(reason=out.finish_reason(done())))
        deltas = [json.loads(c[6:])["choices"][0] for c in chunks]
        content = "".join(d["delta"].get("content") or "" for d in deltas)
        streamed = [t for d in deltas for t in d["delta"].get("tool_calls", [])]
        assert content == "Let me look."
        assert [(t["index"], t["function"]["name"]) for t in streamed] == [
            (0, "get_weather"),
            (1, "get_time"),
        ]
        assert streamed[0]["function"]["arguments"] == '{"city": "Paris"}'
        assert deltas[-1]["finish_reason"] == "tool_calls"


def test_parallel_calls_off_keeps_the_first_call_whole_and_streamed():
    """parallel_tool_calls false (Codex sends it), Anthropic's disable_parallel_tool_use: an
    answer that writes two calls hands out its first only."""
    whole = Answer("answer", "deepseek_r1", None, single_call=True)
    whole.feed(TWO_CALLS)
    whole.finish()
    assert [c.name for c in whole.whole().calls] == ["get_weather"]
    for size in (1, 5):
        streamed = Answer("answer", "deepseek_r1", None, single_call=True)
        calls = []
        for i in range(0, len(TWO_CALLS), size):
            calls += streamed.feed(TWO_CALLS[i : i + size]).calls
        calls += streamed.finish().calls
        assert [c.name for c in calls] == ["get_weather"]


def test_a_malformed_or_unfinished_call_comes_back_as_text():
    bad = r1.CALLS_BEGIN + r1_call("get_weather", "{not json") + r1.CALLS_END
    cut = r1.CALLS_BEGIN + r1.CALL_BEGIN + "function" + r1.TOOL_SEP + "get_wea"
    for text, reason in ((bad, "stop"), (cut, "length")):
        [choice] = output(False).whole(done(text, reason))["choices"]
        assert "tool_calls" not in choice["message"]
        assert "get_weather" in choice["message"]["content"] or "get_wea" in text
        assert choice["finish_reason"] == reason
    # with no tool format (tool_choice "none"), the markers are text as generated
    [choice] = output(False, None).whole(done(TWO_CALLS))["choices"]
    assert choice["message"]["content"] == TWO_CALLS and choice["finish_reason"] == "stop"


# ---------------------------------------------------------------- in-process refusals


@contextlib.contextmanager
def served(tokenizer, name: str):
    coordinator = Coordinator(FakeRunner(2), tokenizer, set(tokenizer.eos_token_ids))
    loop = threading.Thread(target=coordinator.run, daemon=True)
    loop.start()
    info = {"ranks": 2, "parallel": "pipeline", "context": 4096, "vocab_size": len(tokenizer.vocab)}
    try:
        with TestClient(create_app(coordinator, name, info)) as client:
            yield client
    finally:
        coordinator.shutdown()
        loop.join(10)


CHAT = {"messages": [QUESTION], "max_tokens": 4}
REFUSED = [
    ("tool_choice required, no tools", {"tool_choice": "required"}, "no tools are given"),
    (
        "a named tool that is not offered",
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "'nope'",
    ),
    ("tool_choice unknown", {"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ("a tool without a function", {"tools": [{"type": "function"}]}, "tools[0].function"),
    (
        "required with a response_format",
        {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
        "cannot both be enforced",
    ),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, "needs logprobs"),
    ("top_logprobs above 20", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("a logit_bias key that is no id", {"logit_bias": {"x": 1}}, "'x' is not a token id"),
    ("a logit_bias id past the vocabulary", {"logit_bias": {"99999999": 1}}, "outside the voc"),
    ("a logit_bias above 100", {"logit_bias": {"5": 101}}, "outside -100..100"),
    ("presence_penalty above 2", {"presence_penalty": 2.5}, "presence_penalty"),
    ("frequency_penalty below -2", {"frequency_penalty": -3}, "frequency_penalty"),
    ("repetition_penalty 0", {"repetition_penalty": 0}, "repetition_penalty"),
    ("response_format of no type", {"response_format": {"type": "xml"}}, "response_format"),
    (
        "a template argument of its own",
        {"chat_template_kwargs": {"messages": "x"}},
        "'messages' cannot be set",
    ),
    (
        "ignore_eos with an enforced form",
        {"ignore_eos": True, "response_format": {"type": "json_object"}},
        "ignore_eos",
    ),
    (
        "a schema feature that cannot be enforced",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?=a)a"}},
            }
        },
        "response_format",
    ),
]


@pytest.fixture(scope="module")
def r1_client(tiny_r1):
    with served(load_tokenizer(tiny_r1), "tiny-r1") as client:
        yield client


@pytest.mark.parametrize("what,extra,fragment", REFUSED, ids=[r[0] for r in REFUSED])
def test_refusals_are_400s_in_openais_shape(r1_client, what, extra, fragment):
    r = r1_client.post("/v1/chat/completions", json=CHAT | extra)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"] and "\n" not in error["message"]


def test_null_is_a_nullable_fields_default_and_template_switches_pass(r1_client):
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "logprobs": None}
    nulls |= {"presence_penalty": None, "frequency_penalty": None, "parallel_tool_calls": None}
    switches = {"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}}
    r = r1_client.post("/v1/chat/completions", json=CHAT | nulls | switches | {"max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"


def test_completions_logprobs_are_0_to_5(r1_client):
    r = r1_client.post("/v1/completions", json={"prompt": [5, 6], "logprobs": 6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_a_template_without_tools_refuses_them_in_one_line(smollm2):
    with served(load_tokenizer(smollm2), "smollm2") as client:
        r = client.post("/v1/chat/completions", json=CHAT | {"tools": [WEATHER]})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == (
            "tools: this model's chat template has no tool calls, so tools cannot be offered"
        )
        # without tools the same chat is answered
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


# ---------------------------------------------------------------- through real ranks


@pytest.fixture(scope="module")
def cluster(shared_r1):
    from openai import OpenAI

    url, health, _ = shared_r1  # tiny-r1 on [2, 2], shared with other files (conftest)
    return url, health, OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def _round_trip(client, ends: list[int], choice, stream: bool):
    """The forced call, then the answer after the tool's output: (call, answer text, usage of
    the two requests, the ids the ranks generated for the call)."""
    # The grammar lets R1 reason up to </think>, and once a call is whole allows another
    # ("\n") or the section's end; the bias closes the reasoning at once and picks the end, so
    # the answer is one call.
    bias = {str(i): 30 for i in ends}
    first = dict(
        model="tiny-r1",
        messages=[QUESTION],
        tools=[WEATHER],
        tool_choice=choice,
        max_tokens=60,
        temperature=0,
        logit_bias=bias,
        extra_body={"return_token_ids": True},
    )
    if stream:
        calls: dict[int, dict] = {}
        reason = None
        ids = []
        for chunk in client.chat.completions.create(**first, stream=True):
            for c in chunk.choices:
                reason = c.finish_reason or reason
                ids += (c.model_extra or {}).get("token_ids") or []
                for t in c.delta.tool_calls or []:
                    got = calls.setdefault(t.index, {"id": t.id, "name": "", "arguments": ""})
                    got["name"] += t.function.name or ""
                    got["arguments"] += t.function.arguments or ""
        assert reason == "tool_calls" and list(calls) == [0]
        call = calls[0]
    else:
        r = client.chat.completions.create(**first)
        [c] = r.choices
        assert c.finish_reason == "tool_calls"
        [t] = c.message.tool_calls
        call = {"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
        ids = c.model_extra["token_ids"]
    assistant = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": call["name"], "arguments": call["arguments"]},
            }
        ],
    }
    tool = {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"}
    second = dict(
        model="tiny-r1",
        messages=[QUESTION, assistant, tool],
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=6,
        temperature=0,
    )
    if stream:
        text = "".join(
            c.delta.content or ""
            for chunk in client.chat.completions.create(**second, stream=True)
            for c in chunk.choices
        )
    else:
        r2 = client.chat.completions.create(**second)
        assert r2.choices[0].message.tool_calls is None
        assert r2.choices[0].finish_reason in ("stop", "length")
        text = r2.choices[0].message.content
    return call, text, ids


@pytest.mark.cluster
def test_a_tool_round_trip_with_the_openai_client_whole_and_streamed(cluster, tiny_r1):
    url, _, client = cluster
    tokenizer = load_tokenizer(tiny_r1)
    named = {"type": "function", "function": {"name": "get_weather"}}
    ends = [tokenizer.get_vocab()[t] for t in (r1.END_THINK, r1.CALLS_END)]
    whole_call, whole_text, ids = _round_trip(client, ends, named, stream=False)
    # the call was parsed from what the ranks generated: R1-0528's tokens
    generated = tokenizer.decode(ids)
    reasoning, _, calls = generated.partition(r1.END_THINK)
    assert calls.lstrip().startswith(r1.CALLS_BEGIN + r1.CALL_BEGIN + "function" + r1.TOOL_SEP)
    assert whole_call["name"] == "get_weather"
    assert json.loads(whole_call["arguments"])["city"] in ("Paris", "Rome")
    jsonschema.validate(json.loads(whole_call["arguments"]), WEATHER["function"]["parameters"])
    streamed_call, streamed_text, streamed_ids = _round_trip(client, ends, "required", stream=True)
    # greedy: the same call, and the same answer after the tool's output
    assert (streamed_call["name"], streamed_call["arguments"]) == (
        whole_call["name"],
        whole_call["arguments"],
    )
    assert streamed_ids == ids
    assert streamed_text == whole_text and whole_text


@pytest.mark.cluster
def test_logprobs_are_the_models_own_log_softmax(cluster):
    url, health, client = cluster
    prompt = [5, 17, 42, 99]
    r = client.completions.create(
        model="tiny-r1", prompt=prompt, max_tokens=3, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    logits = httpx.post(url + "/mlxdist/logits", json={"prompt": prompt}, timeout=60).json()
    logits = logits["logits"]
    top = max(logits)
    lse = top + math.log(sum(math.exp(x - top) for x in logits))
    first = max(range(len(logits)), key=logits.__getitem__)  # greedy: the argmax
    assert abs(lp.token_logprobs[0] - (logits[first] - lse)) < 1e-4
    assert lp.tokens[0] in lp.top_logprobs[0] and len(lp.top_logprobs[0]) <= 3
    assert max(lp.top_logprobs[0].values()) == pytest.approx(lp.token_logprobs[0], abs=1e-6)
    assert lp.text_offset[0] == 0
    # chat: whole and streamed alike, one entry per generated token, its top sorted
    body = dict(
        model="tiny-r1",
        messages=[QUESTION],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    whole = client.chat.completions.create(**body)
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens == 5
    for e in entries:
        assert [t.logprob for t in e.top_logprobs] == sorted(
            (t.logprob for t in e.top_logprobs), reverse=True
        )
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-6)
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    streamed = [
        e
        for chunk in client.chat.completions.create(**body, stream=True)
        for c in chunk.choices
        if c.logprobs
        for e in c.logprobs.content or []
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


@pytest.mark.cluster
def test_logit_bias_steers_and_a_json_schema_holds(cluster, tiny_r1):
    from mlxdist.runtime.tiktoken_tokenizer import load_tokenizer

    url, _, client = cluster
    r = client.completions.create(
        model="tiny-r1",
        prompt=[5, 6, 7],
        max_tokens=4,
        temperature=0,
        logit_bias={"300": 100},
        extra_body={"return_token_ids": True},
    )
    assert r.choices[0].model_extra["token_ids"] == [300] * 4
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
        "required": ["answer", "sure"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}
    # R1's prompt leaves it inside <think>: it reasons first, then the JSON follows </think>
    # (steered to close the block at once: a random model never closes it by itself).
    close = load_tokenizer(tiny_r1).vocab["</think>"]
    chat = client.chat.completions.create(
        model="tiny-r1",
        messages=[QUESTION],
        max_tokens=40,
        response_format=fmt,
        logit_bias={str(close): 100},
        extra_body={"return_token_ids": True},
    )
    jsonschema.validate(json.loads(chat.choices[0].message.content), schema)
    assert chat.choices[0].model_extra["token_ids"][0] == close  # the grammar let it close


def test_gpt_oss_calls_come_from_its_harmony_messages():
    # a harmony call: a commentary message addressed to functions.NAME (openai/harmony's docs)
    text = (
        "<|channel|>analysis<|message|>The user wants the weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city":"Paris"}'
    )
    answer = Answer("harmony", "harmony")
    for i in range(0, len(text), 5):
        answer.token(text[i : i + 5])
    answer.finish()
    whole = answer.whole()
    assert whole.reasoning == "The user wants the weather." and whole.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == [
        ("get_weather", {"city": "Paris"})
    ]


def test_harmony_calls_not_asked_for_stay_answer_text():
    """tool_choice none (or no tools) on gpt-oss: a message it addresses to a function anyway
    is answer text, as before calls were read, not dropped."""
    text = (
        "<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city":"Paris"}<|call|>'
    )
    answer = Answer("harmony", None)
    for i in range(0, len(text), 4):
        answer.token(text[i : i + 4])
    answer.finish()
    whole = answer.whole()
    assert json.loads(whole.content) == {"city": "Paris"} and whole.calls == []


def test_arguments_nested_past_pythons_limit_are_a_400_not_a_500():
    from mlxdist.serving.api.errors import APIError
    from mlxdist.serving.api.responses_items import chat_messages

    deep = "[" * 100_000
    call = {"type": "function_call", "name": "f", "call_id": "c1", "arguments": deep}
    with pytest.raises(APIError) as caught:
        chat_messages([call], as_dict=True)
    assert caught.value.status == 400
    request = ChatRequest.model_validate(
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": deep},
                        }
                    ],
                }
            ]
        }
    )
    with pytest.raises(APIError) as caught:
        template_messages(request.messages, as_dict=True)
    assert caught.value.status == 400


@pytest.mark.parametrize("model", ["tiny_r1", "smollm2"])
def test_logprobs_tokens_are_each_tokens_own_bytes(model, request):
    from mlxdist.serving.api.logprobs import TokenBytes

    tokenizer = load_tokenizer(request.getfixturevalue(model))
    of = TokenBytes(tokenizer)
    text = "Größe: 日本語 — naïve café\n\tok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(of(t) for t in ids) == text.encode("utf-8")


@pytest.mark.cluster
def test_tool_choice_none_bans_the_call_even_against_a_bias_for_it(cluster, tiny_r1):
    url, _, client = cluster
    begin = load_tokenizer(tiny_r1).get_vocab()[r1.CALLS_BEGIN]
    body = dict(
        model="tiny-r1",
        messages=[QUESTION],
        tools=[WEATHER],
        max_tokens=3,
        temperature=0,
        logit_bias={str(begin): 100},
        extra_body={"return_token_ids": True, "reasoning_format": "none"},
    )
    auto = client.chat.completions.create(**body, tool_choice="auto")
    assert auto.choices[0].model_extra["token_ids"][0] == begin  # the bias alone: a call opens
    none = client.chat.completions.create(**body, tool_choice="none")
    ids = none.choices[0].model_extra["token_ids"]
    assert begin not in ids and len(ids) == 3
    assert none.choices[0].message.tool_calls is None
