"""OpenAI's Responses API (POST /v1/responses): items as chat-template messages, the output
items and their events, the store (pure), then the official `openai` client's `responses` API
against a real 2-rank tiny-r1 cluster behind an API key: text equal to chat's answer, streamed
events, a function call round trip with previous_response_id, and its errors."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from conftest import SHARED_KEY

from mlxdist.serving.answer import Piece
from mlxdist.serving.api.errors import APIError
from mlxdist.serving.api.responses_items import chat_messages
from mlxdist.serving.api.responses_store import ResponseStore
from mlxdist.serving.api.responses_stream import Items
from mlxdist.serving.tool_calls import ToolCall

# --- pure --------------------------------------------------------------------------------------

CALL = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": 1}'}
AS_TEMPLATE = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}

ITEMS = [
    (
        [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    ),
    (
        [
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "a"},
                    {"type": "input_text", "text": "b"},
                ],
            }
        ],
        [{"role": "user", "content": "ab"}],
    ),
    (  # a stored answer's items: reasoning, a message, a call; then the call's output
        [
            {"role": "user", "content": "Hi"},
            {
                "type": "reasoning",
                "id": "rs",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "hm"}],
            },
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Ok."}],
            },
            CALL,
            {"type": "function_call_output", "call_id": "c1", "output": "2"},
        ],
        [
            {"role": "user", "content": "Hi"},
            {
                "role": "assistant",
                "content": "Ok.",
                "reasoning_content": "hm",
                "tool_calls": [AS_TEMPLATE],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "2"},
        ],
    ),
    (  # a call with no message before it makes one
        [CALL, CALL | {"call_id": "c2"}],
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [AS_TEMPLATE, AS_TEMPLATE | {"id": "c2"}],
            }
        ],
    ),
]


@pytest.mark.parametrize(("items", "expected"), ITEMS)
def test_items_become_template_messages(items, expected):
    assert chat_messages(items, as_dict=True) == expected


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ({"role": "robot", "content": "x"}, "input[0].role"),
        (
            {"role": "user", "content": [{"type": "input_image", "image_url": "u"}]},
            "input[0].content[0]",
        ),
        (CALL | {"arguments": "[1]"}, "input[0].arguments"),
        ({"type": "web_search_call"}, "input[0].type"),
        ("text", "input[0]"),
    ],
)
def test_a_bad_item_is_a_400_naming_it(item, param):
    with pytest.raises(APIError) as caught:
        chat_messages([item], as_dict=True)
    assert caught.value.status == 400 and caught.value.param == param


def test_output_items_and_their_events_in_the_order_written():
    items = Items()
    call = ToolCall("call_1", "f", '{"a": 1}')
    pieces = [Piece("th", ""), Piece("ink", "He"), Piece("", "llo", [call])]
    events = [e for p in pieces for e in items.add(p)] + items.close()
    assert [e["type"] for e in events] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert [e["output_index"] for e in events] == [0] * 7 + [1] * 7 + [2] * 4
    reasoning, message, function = items.output
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "think"}]
    assert message["content"][0] | {"annotations": []} == {
        "type": "output_text",
        "text": "Hello",
        "annotations": [],
        "logprobs": [],
    }
    assert function | {"id": ""} == {
        "id": "",
        "type": "function_call",
        "status": "completed",
        "call_id": "call_1",
        "name": "f",
        "arguments": '{"a": 1}',
    }
    # an item's added event shows it as it began
    assert events[14]["item"]["arguments"] == "" and events[-1]["item"]["arguments"] == '{"a": 1}'


def test_the_store_forgets_the_least_recently_used_by_count_and_by_bytes():
    store = ResponseStore(max_responses=2, max_bytes=10_000)
    for name in "abc":
        store.put(name, [{"x": name}], {})
    assert store.get("a") is None and store.get("b") and store.get("c")
    store.get("b")  # b is now the most recent
    store.put("d", [{"x": "d"}], {})
    assert store.get("c") is None and store.get("b") and store.get("d")
    store.put("big", [{"x": "y" * 6_000}], {})
    assert store.get("big") and store.bytes <= 10_000
    store.put("bigger", [{"x": "y" * 6_000}], {})
    assert store.get("big") is None and store.get("bigger")
    store.put("huge", [{"x": "y" * 20_000}], {})  # past the whole budget: not kept
    assert store.get("huge") is None and store.get("bigger")
    assert store.delete("bigger") and not store.delete("bigger") and store.bytes == 0


# --- through real ranks -----------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
    "required": ["city"],
}
TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Weather", "parameters": SCHEMA}
]
QUESTION = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def served(shared_r1_keyed):
    url, _, _ = shared_r1_keyed
    client = openai.OpenAI(base_url=url + "/v1", api_key=SHARED_KEY, max_retries=0)
    return url, client.models.list().data[0].id, client


def output_texts(response) -> tuple[str, str]:
    reasoning = "".join(
        c.text for item in response.output if item.type == "reasoning" for c in item.content or []
    )
    return reasoning, response.output_text


@pytest.mark.cluster
def test_text_whole_and_streamed_is_the_chat_answer(served):
    _, model, client = served
    whole = client.responses.create(
        model=model, input=QUESTION, instructions="Answer briefly.", max_output_tokens=10
    )
    chat = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": QUESTION},
        ],
        max_tokens=10,
        temperature=0,
    )
    message = chat.choices[0].message
    expected = (message.model_extra.get("reasoning_content") or "", message.content)
    assert output_texts(whole) == expected
    assert whole.output[0].type == "reasoning"  # tiny-r1's prompt opens <think>
    assert whole.id.startswith("resp_") and whole.model == model
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert whole.usage.output_tokens == 10 and whole.usage.output_tokens_details.reasoning_tokens
    with client.responses.stream(
        model=model, input=QUESTION, instructions="Answer briefly.", max_output_tokens=10
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.completed" and "response.reasoning_text.delta" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert output_texts(final) == expected and final.status == "incomplete"
    # reasoning off: the think block is closed, the answer is a message at once
    direct = client.responses.create(
        model=model, input=QUESTION, max_output_tokens=6, reasoning={"effort": "none"}
    )
    assert [item.type for item in direct.output] == ["message"] and direct.output_text


@pytest.mark.cluster
def test_a_function_call_round_trip_with_previous_response_id(served):
    url, model, client = served
    off = {"effort": "none"}  # tiny-r1 would reason on to the limit: the call comes at once
    first = client.responses.create(
        model=model,
        input=QUESTION,
        tools=TOOLS,
        tool_choice="required",
        reasoning=off,
        max_output_tokens=40,
    )
    assert first.status == "completed"
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments)["city"] in ("Paris", "London")
    back = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    second = client.responses.create(
        model=model, previous_response_id=first.id, input=[back], tools=TOOLS, max_output_tokens=6
    )
    assert second.previous_response_id == first.id and second.output
    # the question, the call and its output are the second prompt: it is longer by them
    assert second.usage.input_tokens > first.usage.input_tokens + 10
    # streamed, a named function: the arguments come as deltas
    named = {"type": "function", "name": "get_weather"}
    with client.responses.stream(
        model=model,
        input=QUESTION,
        tools=TOOLS,
        tool_choice=named,
        reasoning=off,
        max_output_tokens=40,
    ) as stream:
        kinds = [e.type for e in stream]
        streamed = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert [(i.type, i.name, i.arguments) for i in streamed.output] == [
        ("function_call", call.name, call.arguments)
    ]
    # a stored response can be read back; one not stored cannot be continued
    assert client.responses.retrieve(first.id).output[0].call_id == call.call_id
    unstored = client.responses.create(model=model, input="Hi", max_output_tokens=1, store=False)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model=model, input="Hi", previous_response_id=unstored.id)
    assert caught.value.code == "previous_response_not_found"
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


@pytest.mark.cluster
def test_errors_in_openais_shape(served):
    url, model, client = served
    cases = [
        (openai.BadRequestError, dict(input=[{"role": "robot", "content": "x"}]), "input[0].role"),
        (openai.BadRequestError, dict(input="x", tools=[{"type": "web_search"}]), "tools[0].type"),
        (openai.BadRequestError, dict(input="x", tool_choice="required"), None),
        (
            openai.BadRequestError,
            dict(input="x", text={"format": {"type": "json_schema", "name": "n"}}),
            "text.format.schema",
        ),
        (openai.NotFoundError, dict(input="x", model="gpt-5"), "model"),
        (openai.BadRequestError, dict(input="x", conversation="conv_1"), "conversation"),
    ]
    for error, ask, param in cases:
        with pytest.raises(error) as caught:
            client.responses.create(**({"model": model, "max_output_tokens": 2} | ask))
        assert caught.value.body["param"] == param, caught.value.body
    r = httpx.post(url + "/v1/responses", json={"model": model, "input": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] is None
    # null in a nullable field is its default, as the openai client sends a None; a call with
    # no arguments may come back as ""; usage has every field the client's types require
    nulls = {"temperature": None, "top_p": None, "stream": None, "parallel_tool_calls": None}
    call = {"type": "function_call", "name": "now", "call_id": "c1", "arguments": ""}
    output = {"type": "function_call_output", "call_id": "c1", "output": "noon"}
    body = {"model": model, "input": [call, output], "max_output_tokens": 2, **nulls}
    key = {"Authorization": f"Bearer {SHARED_KEY}"}
    r = httpx.post(url + "/v1/responses", json=body, headers=key)
    assert r.status_code == 200, r.text
    openai.types.responses.Response.model_validate(r.json())


@pytest.mark.cluster
def test_a_text_format_holds_the_answer_to_its_schema(served):
    _, model, client = served
    fmt = {"type": "json_schema", "name": "weather", "schema": SCHEMA, "strict": True}
    # Reasoning off: R1 would reason first (up to </think>, then the JSON), and a random
    # tiny-r1 never closes its think block by itself.
    response = client.responses.create(
        model=model,
        input=QUESTION,
        text={"format": fmt},
        max_output_tokens=30,
        reasoning={"effort": "none"},
    )
    assert [i.type for i in response.output] == ["message"] and response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), SCHEMA)
