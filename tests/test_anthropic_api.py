"""Anthropic's Messages API (POST /v1/messages): the request's translation and the answer's
blocks and events (pure), then the official `anthropic` client against a real 2-rank tiny-r1
cluster behind an API key: whole and streamed messages equal to OpenAI chat's answer, thinking
blocks, a stop sequence, a tool round trip, count_tokens and errors in Anthropic's shape."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest
from conftest import SHARED_KEY

from mlxdist.serving.answer import Piece
from mlxdist.serving.api.anthropic import chat_messages, error_body
from mlxdist.serving.api.anthropic_schema import MessagesRequest
from mlxdist.serving.api.anthropic_stream import Blocks, signature
from mlxdist.serving.guard import Policy
from mlxdist.serving.tool_calls import ToolCall

# --- pure: the request as chat-template messages ----------------------------------------------

USE = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}
CALL = {"id": "toolu_1", "type": "function"}

TRANSLATIONS = [
    (
        {"system": "Be brief.", "messages": [{"role": "user", "content": "Hi"}]},
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    ),
    (
        {
            "system": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}],
                }
            ],
        },
        [{"role": "system", "content": "A\n\nB"}, {"role": "user", "content": "x\ny"}],
    ),
    (  # a tool round trip: the call as the assistant's tool_calls, the result as a tool message
        {
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "let me see", "signature": "s"},
                        {"type": "text", "text": "Checking."},
                        USE,
                    ],
                },
                {"role": "user", "content": [RESULT]},
            ]
        },
        [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "reasoning_content": "let me see",
                "tool_calls": [
                    CALL | {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        ],
    ),
    (  # an error result is marked; text after results is the user's next message
        {
            "messages": [
                {"role": "assistant", "content": [USE]},
                {
                    "role": "user",
                    "content": [RESULT | {"is_error": True}, {"type": "text", "text": "go on"}],
                },
            ]
        },
        [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    CALL | {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: sunny"},
            {"role": "user", "content": "go on"},
        ],
    ),
]


@pytest.mark.parametrize(("body", "expected"), TRANSLATIONS)
def test_a_request_becomes_template_messages(body, expected):
    req = MessagesRequest.model_validate({"model": "m", "max_tokens": 1} | body)
    assert chat_messages(req, as_dict=True) == expected


def test_arguments_go_as_text_to_a_template_that_prints_them():
    body = {"messages": [{"role": "assistant", "content": [USE]}]}
    req = MessagesRequest.model_validate({"model": "m", "max_tokens": 1} | body)
    call = chat_messages(req, as_dict=False)[0]["tool_calls"][0]
    assert call["function"]["arguments"] == '{"city": "Paris"}'


def test_blocks_and_their_events_in_the_order_written():
    blocks = Blocks()
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    pieces = [Piece("thin", ""), Piece("king", "Hel"), Piece("", "lo", [call]), Piece("", "!")]
    events = [e for p in pieces for e in blocks.add(p)] + blocks.close()
    kinds = [(e["type"], e.get("index"), e.get("delta", {}).get("type")) for e in events]
    assert kinds == [
        ("content_block_start", 0, None),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "signature_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, None),
        ("content_block_delta", 1, "text_delta"),
        ("content_block_delta", 1, "text_delta"),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, None),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None),
        ("content_block_start", 3, None),
        ("content_block_delta", 3, "text_delta"),
        ("content_block_stop", 3, None),
    ]
    assert blocks.content == [
        {"type": "thinking", "thinking": "thinking", "signature": signature("thinking")},
        {"type": "text", "text": "Hello"},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "text", "text": "!"},
    ]
    assert events[0]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}


def test_hidden_thinking_makes_no_block():
    blocks = Blocks(show_thinking=False)
    events = blocks.add(Piece("why", "")) + blocks.add(Piece("more", "A")) + blocks.close()
    assert blocks.content == [{"type": "text", "text": "A"}]
    assert [e["type"] for e in events][0] == "content_block_start"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (500, "api_error"),
        (503, "overloaded_error"),
    ],
)
def test_errors_take_anthropics_types(status, kind):
    assert error_body(status, "why") == {"type": "error", "error": {"type": kind, "message": "why"}}


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "ok"),
    [
        ("Bearer k-12345678", None, True),
        (None, "k-12345678", True),
        ("Bearer wrong", "k-12345678", True),
        (None, "wrong", False),
        ("k-12345678", None, False),
        (None, None, False),
    ],
)
def test_the_key_in_either_header(authorization, x_api_key, ok):
    assert Policy(api_key="k-12345678").authorized(authorization, x_api_key) is ok


# --- through real ranks -----------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
    "required": ["city"],
}
TOOLS = [{"name": "get_weather", "description": "The weather in a city", "input_schema": SCHEMA}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def served(shared_r1_keyed):
    url, _, _ = shared_r1_keyed
    auth = {"Authorization": f"Bearer {SHARED_KEY}"}
    model = httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"]
    client = anthropic.Anthropic(base_url=url, api_key=SHARED_KEY, max_retries=0)
    return url, model, client


def chat(url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
    auth = {"Authorization": f"Bearer {SHARED_KEY}"}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=60)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]


def texts(content) -> tuple[str, str]:
    thinking = "".join(b.thinking for b in content if b.type == "thinking")
    return thinking, "".join(b.text for b in content if b.type == "text")


@pytest.mark.cluster
def test_a_message_whole_and_streamed_is_the_chat_answer(served):
    url, model, client = served
    ask = dict(model=model, max_tokens=12, messages=ASK)  # temperature: 0 by default
    whole = client.messages.create(**ask)
    # tiny-r1's prompt opens <think>: its answer is reasoning, in thinking blocks
    assert whole.content and whole.content[0].type == "thinking"
    assert whole.content[0].signature == signature(whole.content[0].thinking)
    expected = chat(url, model, ASK, 12)
    assert texts(whole.content) == (expected["reasoning_content"] or "", expected["content"])
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 12
    assert whole.id.startswith("msg_") and whole.model == model and whole.role == "assistant"
    with client.messages.stream(**ask) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert texts(streamed.content) == texts(whole.content)
    assert streamed.stop_reason == "max_tokens" and streamed.usage.output_tokens == 12
    # a count of the same conversation is the prompt the message read
    count = client.messages.count_tokens(model=model, messages=ASK).input_tokens
    usage = whole.usage
    assert count == usage.input_tokens + usage.cache_read_input_tokens
    # thinking disabled: the prompt's think block is closed, the answer is text at once
    direct = client.messages.create(**ask, thinking={"type": "disabled"})
    assert [b.type for b in direct.content] == ["text"] and direct.usage.output_tokens == 12
    assert direct.usage.input_tokens + direct.usage.cache_read_input_tokens > count
    # a last assistant message is the answer's start (prefill): it goes on from there, with no
    # new turn and no reasoning of its own
    prefilled = ASK + [{"role": "assistant", "content": '{"answer": '}]
    goes_on = client.messages.create(**(ask | {"messages": prefilled}))
    assert [b.type for b in goes_on.content] == ["text"] and goes_on.usage.output_tokens == 12
    # without the prefill the same conversation opens R1's think block: a thinking block first
    plain = client.messages.create(**ask)
    assert plain.content[0].type == "thinking"
    # a thinking budget: after 3 tokens of reasoning the block closes and the text follows
    # (a random tiny-r1 never closes it by itself)
    budget = client.messages.create(**ask, thinking={"type": "enabled", "budget_tokens": 3})
    kinds = [b.type for b in budget.content]
    assert kinds == ["thinking", "text"] and budget.usage.output_tokens == 12, budget.content


@pytest.mark.cluster
def test_a_stop_sequence_ends_the_message_and_is_named(served):
    _, model, client = served
    ask = dict(model=model, max_tokens=12, messages=ASK)  # temperature: 0 by default
    thinking, _ = texts(client.messages.create(**ask).content)
    stop = thinking[4:6]
    assert len(stop) == 2, thinking
    cut = client.messages.create(**ask, stop_sequences=["never-there", stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert texts(cut.content)[0] == thinking[: thinking.index(stop)]


@pytest.mark.cluster
def test_a_tool_round_trip(served):
    _, model, client = served
    # Without reasoning (tiny-r1 would reason on to max_tokens) the forced call comes at once.
    off = {"type": "disabled"}
    forced = {"type": "tool", "name": "get_weather"}
    first = client.messages.create(
        model=model, max_tokens=40, messages=ASK, tools=TOOLS, tool_choice=forced, thinking=off
    )
    assert first.stop_reason == "tool_use", first
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input["city"] in ("Paris", "London")
    turn = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C"}],
        },
    ]
    final = client.messages.create(model=model, max_tokens=8, messages=turn, tools=TOOLS)
    assert final.stop_reason in ("end_turn", "max_tokens") and final.content
    assert all(b.type in ("text", "thinking") for b in final.content)
    # the call and its result are in the prompt: it is longer than the first one by both
    grown = client.messages.count_tokens(model=model, messages=turn, tools=TOOLS).input_tokens
    before = client.messages.count_tokens(model=model, messages=ASK, tools=TOOLS).input_tokens
    assert grown > before + 10
    # streamed, with any tool: the call comes as input_json deltas
    with client.messages.stream(
        model=model,
        max_tokens=40,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "any"},
        thinking=off,
    ) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        message = stream.get_final_message()
    assert "input_json_delta" in deltas and message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["tool_use"]
    assert message.content[0].input["city"] in ("Paris", "London")


@pytest.mark.cluster
def test_errors_in_anthropics_shape(served):
    url, model, client = served
    cases = [
        (anthropic.BadRequestError, dict(model=model, max_tokens=0, messages=ASK), "max_tokens"),
        (
            anthropic.BadRequestError,
            dict(
                model=model, max_tokens=4, messages=ASK, tools=TOOLS, tool_choice={"type": "tool"}
            ),
            "tool_choice",
        ),
        (
            anthropic.BadRequestError,
            dict(
                model=model,
                max_tokens=4,
                messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}],
            ),
            "image",
        ),
        (anthropic.NotFoundError, dict(model="claude-x", max_tokens=4, messages=ASK), "claude-x"),
    ]
    for error, ask, word in cases:
        with pytest.raises(error) as caught:
            client.messages.create(**ask)
        assert (
            caught.value.body["type"] == "error" and word in caught.value.body["error"]["message"]
        )
    wrong = anthropic.Anthropic(base_url=url, api_key="wrong-key-000000", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        wrong.messages.create(model=model, max_tokens=4, messages=ASK)
    assert caught.value.body["error"]["type"] == "authentication_error"
    # no key at all (the client will not send a request without one)
    r = httpx.post(url + "/v1/messages", json={"model": model, "max_tokens": 1, "messages": ASK})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    # the key as a bearer token (auth_token) passes too
    bearer = anthropic.Anthropic(base_url=url, auth_token=SHARED_KEY, max_retries=0)
    assert bearer.messages.create(model=model, max_tokens=1, messages=ASK).usage.output_tokens == 1


@pytest.mark.cluster
def test_an_output_format_holds_the_answer_to_its_schema(served):
    _, model, client = served
    fmt = {"type": "json_schema", "schema": SCHEMA}
    # Thinking off: R1 would reason first (up to </think>, then the JSON), and a random
    # tiny-r1 never closes its think block by itself.
    message = client.messages.create(
        model=model,
        max_tokens=30,
        messages=ASK,
        output_config={"format": fmt},
        thinking={"type": "disabled"},
    )
    assert [b.type for b in message.content] == ["text"] and message.stop_reason == "end_turn"
    jsonschema.validate(json.loads(message.content[0].text), SCHEMA)
    with pytest.raises(anthropic.BadRequestError) as caught:
        bad = {"type": "json_schema", "schema": {"type": "string", "pattern": "(?=a)a"}}
        client.messages.create(
            model=model, max_tokens=4, messages=ASK, output_config={"format": bad}
        )
    assert "output_config.format" in caught.value.body["error"]["message"]
