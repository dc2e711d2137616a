"""Anthropic Messages (/v1/messages, /v1/messages/count_tokens) and OpenAI Responses
(/v1/responses) of a real 2-rank tiny-r1 cluster, fuzzed with hypothesis.

Valid-looking and invalid bodies (content blocks, tool use and results, thinking, tools and
tool choices, output formats, input items, previous response ids) and raw bytes: the server never
answers 5xx, every refusal is one line in its API's own error shape (Anthropic's `{"type":
"error", "error": {"type", "message"}}`, OpenAI's `{"error": {...}}`), a stream never carries an
error event, and afterwards both APIs answer exactly as they did before.
"""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
from conftest import SHARED_KEY
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fuzz_api import ANY_JSON, CONTENT_TYPES, HEADER, RAW, SETTINGS, TEXT, mostly

pytestmark = pytest.mark.cluster

HISTOGRAM: Counter[int] = Counter()
ANTHROPIC_KINDS = {
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "overloaded_error",
}
# Anything but a small count: with no limit an answer would run to the context's end.
NOT_A_LIMIT = st.one_of(
    st.sampled_from([0, -1, 2**80, "2", 1.5, True, [], {}]), st.text(max_size=3), st.floats()
)
LIMIT = mostly(st.integers(1, 3), NOT_A_LIMIT)


@pytest.fixture(scope="module")
def server(shared_r1):
    url, health, _ = shared_r1  # tiny-r1 on [2, 2], shared with other files (conftest)
    with httpx.Client(base_url=url, timeout=httpx.Timeout(30.0)) as http:
        # a stored response that follow-ups may name
        stored = http.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 1})
        stored.raise_for_status()
        yield http, health["model"], stored.json()["id"]


def answers(http: httpx.Client, model: str) -> tuple:
    ask = {"model": model, "max_tokens": 6, "messages": [{"role": "user", "content": "hi"}]}
    message = http.post("/v1/messages", json=ask)
    response = http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 6})
    message.raise_for_status()
    response.raise_for_status()
    return message.json()["content"], response.json()["output"][0]["content"]


@pytest.fixture(scope="module")
def reference(server):
    return answers(server[0], server[1])


def post(http: httpx.Client, path: str, content: bytes, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = http.post(path, content=content, headers=headers)
    HISTOGRAM[r.status_code] += 1
    where = f"{path} {content[:300]!r}"
    assert r.status_code < 500, f"{where}: {r.status_code} {r.text[:500]}"
    anthropic = path.startswith("/v1/messages")
    if r.status_code >= 400:
        body = r.json()
        if anthropic:
            assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, where
            assert body["error"]["type"] in ANTHROPIC_KINDS, f"{where}: {body}"
        else:
            assert set(body["error"]) == {"message", "type", "param", "code"}, f"{where}: {body}"
        message = body["error"]["message"]
        assert isinstance(message, str) and message and "\n" not in message, f"{where}: {body}"
    if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
        assert "event: error" not in r.text, f"{where}: {r.text[:500]}"


def post_json(http: httpx.Client, path: str, body) -> None:
    post(http, path, json.dumps(body, allow_nan=True).encode(), "application/json")


def some(d: dict) -> st.SearchStrategy:
    """Dicts with any subset of d's keys, each value drawn from its strategy."""
    return st.fixed_dictionaries({}, optional=d)


SCHEMAS = st.sampled_from(
    [
        {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}},
            "required": ["city"],
        },
        {"type": "object", "properties": {"n": {"type": "integer"}}},
        {"type": "object"},
        {"type": "string", "pattern": "(?=a)a"},  # look-around: refused by name
        {"$ref": "https://example.com/schema.json"},  # external: refused
        {"type": "nothing"},
        {},
    ]
)
NAMES = mostly(st.sampled_from(["get_weather", "f"]), st.sampled_from(["", "bad name", "x" * 200]))

# --- Anthropic ---------------------------------------------------------------------------------

TEXT_BLOCK = st.fixed_dictionaries({"type": st.just("text"), "text": mostly(TEXT, ANY_JSON)})
BLOCK = st.one_of(
    TEXT_BLOCK,
    st.fixed_dictionaries(
        {
            "type": st.just("tool_use"),
            "id": TEXT,
            "name": NAMES,
            "input": mostly(st.just({"a": 1}), ANY_JSON),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("tool_result"),
            "tool_use_id": mostly(TEXT, ANY_JSON),
            "content": mostly(TEXT | st.lists(TEXT_BLOCK, max_size=2), ANY_JSON),
        },
        optional={"is_error": mostly(st.booleans(), ANY_JSON)},
    ),
    st.fixed_dictionaries(
        {"type": st.just("thinking"), "thinking": mostly(TEXT, ANY_JSON)},
        optional={"signature": TEXT},
    ),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "redacted_thinking", "video", ""])}),
    ANY_JSON,
)
MESSAGE = mostly(
    st.fixed_dictionaries(
        {
            "role": mostly(
                st.sampled_from(["user", "assistant"]),
                st.sampled_from(["system", "tool"]) | ANY_JSON,
            ),
            "content": mostly(TEXT | st.lists(BLOCK, max_size=3), ANY_JSON),
        }
    ),
    ANY_JSON,
)
ANTHROPIC_TOOL = mostly(
    st.fixed_dictionaries(
        {"name": NAMES, "input_schema": mostly(SCHEMAS, ANY_JSON)},
        optional={
            "description": TEXT,
            "type": st.sampled_from(["custom", "web_search_20250305", "bash_20250124"]),
        },
    ),
    ANY_JSON,
)


def conversation(model: str) -> dict:
    return dict(
        model=mostly(st.just(model), st.sampled_from(["", "claude-x"]) | ANY_JSON),
        messages=mostly(st.lists(MESSAGE, min_size=1, max_size=4), st.just([]) | ANY_JSON),
        system=mostly(TEXT | st.lists(TEXT_BLOCK, max_size=2), ANY_JSON),
        tools=mostly(st.lists(ANTHROPIC_TOOL, max_size=2), ANY_JSON),
        tool_choice=mostly(
            some(
                {
                    "type": st.sampled_from(["auto", "any", "tool", "none", "all"]),
                    "name": NAMES,
                    "disable_parallel_tool_use": st.booleans(),
                }
            ),
            ANY_JSON,
        ),
        thinking=mostly(
            some(
                {
                    "type": st.sampled_from(["enabled", "disabled", "adaptive", "x"]),
                    "budget_tokens": st.integers(-1, 5000),
                    "display": st.sampled_from(["summarized", "omitted", "x"]),
                }
            ),
            ANY_JSON,
        ),
    )


def messages_body(model: str) -> st.SearchStrategy:
    optional = conversation(model) | dict(
        temperature=mostly(st.floats(0, 1), st.sampled_from([-1.0, 1.5]) | ANY_JSON),
        top_p=mostly(st.floats(0.01, 1), ANY_JSON),
        top_k=mostly(st.integers(0, 50), ANY_JSON),
        stop_sequences=mostly(st.lists(TEXT, max_size=3), ANY_JSON),
        stream=mostly(st.booleans(), ANY_JSON),
        metadata=mostly(some({"user_id": TEXT}), ANY_JSON),
        output_config=mostly(
            some(
                {
                    "format": mostly(
                        st.fixed_dictionaries({"type": st.just("json_schema"), "schema": SCHEMAS}),
                        ANY_JSON,
                    )
                }
            ),
            ANY_JSON,
        ),
    )
    required = st.fixed_dictionaries(
        {"model": st.just(model), "messages": st.just([{"role": "user", "content": "hi"}])}
    )
    return st.builds(
        lambda r, o, limit: {**r, **o, "max_tokens": limit}, required, some(optional), LIMIT
    )


# --- Responses ---------------------------------------------------------------------------------

PART = mostly(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["input_text", "output_text", "refusal", "input_image"]),
            "text": mostly(TEXT, ANY_JSON),
        }
    ),
    ANY_JSON,
)
ITEM = st.one_of(
    st.fixed_dictionaries(
        {
            "role": mostly(st.sampled_from(["user", "assistant", "system", "developer"]), ANY_JSON),
            "content": mostly(TEXT | st.lists(PART, max_size=2), ANY_JSON),
        },
        optional={"type": st.just("message")},
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("function_call"),
            "call_id": mostly(TEXT, ANY_JSON),
            "name": NAMES,
            "arguments": mostly(st.sampled_from(['{"a": 1}', "{}", "[1]", "{"]), ANY_JSON),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("function_call_output"),
            "call_id": mostly(TEXT, ANY_JSON),
            "output": mostly(TEXT, ANY_JSON),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("reasoning")},
        optional={"content": ANY_JSON, "summary": ANY_JSON},
    ),
    ANY_JSON,
)
RESPONSES_TOOL = mostly(
    st.fixed_dictionaries(
        {
            "type": mostly(st.just("function"), st.sampled_from(["web_search", "file_search"])),
            "name": NAMES,
        },
        optional={
            "parameters": mostly(SCHEMAS, ANY_JSON),
            "description": TEXT,
            "strict": st.booleans(),
        },
    ),
    ANY_JSON,
)
TEXT_FORMAT = st.one_of(
    st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "yaml"}]),
    st.builds(lambda s: {"type": "json_schema", "name": "n", "schema": s}, SCHEMAS | ANY_JSON),
    ANY_JSON,
)


def responses_body(model: str, stored: str) -> st.SearchStrategy:
    optional = dict(
        model=mostly(st.sampled_from([model, None]), st.sampled_from(["gpt-5"]) | ANY_JSON),
        instructions=mostly(TEXT, ANY_JSON),
        temperature=mostly(st.floats(0, 2), ANY_JSON),
        top_p=mostly(st.floats(0.01, 1), ANY_JSON),
        tools=mostly(st.lists(RESPONSES_TOOL, max_size=2), ANY_JSON),
        tool_choice=mostly(
            st.sampled_from(["auto", "none", "required"])
            | st.fixed_dictionaries({"type": st.just("function"), "name": NAMES}),
            ANY_JSON,
        ),
        text=mostly(some({"format": TEXT_FORMAT}), ANY_JSON),
        reasoning=mostly(
            some({"effort": st.sampled_from(["none", "low", "high", "max"])}), ANY_JSON
        ),
        stream=mostly(st.booleans(), ANY_JSON),
        store=mostly(st.booleans(), ANY_JSON),
        previous_response_id=mostly(st.sampled_from([stored, "resp_nope"]), ANY_JSON),
        parallel_tool_calls=mostly(st.booleans(), ANY_JSON),
    )
    inputs = mostly(TEXT | st.lists(ITEM, min_size=1, max_size=4), ANY_JSON)
    return st.builds(
        lambda i, o, limit: {"input": i, **o, "max_output_tokens": limit},
        inputs,
        some(optional),
        LIMIT,
    )


# --- the tests -------------------------------------------------------------------------------


def fuzz_messages(http, model, stored) -> None:
    @settings(max_examples=110, **SETTINGS)
    @given(messages_body(model))
    def run(body):
        post_json(http, "/v1/messages", body)

    run()


def fuzz_count_tokens(http, model, stored) -> None:
    @settings(max_examples=40, **SETTINGS)
    @given(some(conversation(model)))
    def run(body):
        post_json(http, "/v1/messages/count_tokens", body)

    run()


def fuzz_responses(http, model, stored) -> None:
    @settings(max_examples=110, **SETTINGS)
    @given(responses_body(model, stored))
    def run(body):
        post_json(http, "/v1/responses", body)

    run()


def fuzz_raw(http, model, stored) -> None:
    paths = st.sampled_from(["/v1/messages", "/v1/messages/count_tokens", "/v1/responses"])

    @settings(max_examples=60, **SETTINGS)
    @given(paths, RAW, CONTENT_TYPES)
    def run(where, body, content_type):
        post(http, where, body, content_type)

    run()


FUZZERS = [fuzz_messages, fuzz_count_tokens, fuzz_responses, fuzz_raw]
FUZZED: set = set()


def fuzz(server, fuzzer) -> None:
    fuzzer(*server)
    FUZZED.add(fuzzer)


def test_fuzz_messages(server, reference):
    fuzz(server, fuzz_messages)


def test_fuzz_count_tokens(server, reference):
    fuzz(server, fuzz_count_tokens)


def test_fuzz_responses(server, reference):
    fuzz(server, fuzz_responses)


def test_fuzz_raw_bodies(server, reference):
    fuzz(server, fuzz_raw)


def test_fuzz_the_key_headers(shared_r1_keyed):
    """Behind a key, either header (Authorization: Bearer, or Anthropic's x-api-key) holding it
    lets a request through, and nothing else does; a refusal is a 401 in the path's API's shape."""
    url, _, _ = shared_r1_keyed
    authorizations = st.none() | st.sampled_from(
        [f"Bearer {SHARED_KEY}", "Bearer wrong", SHARED_KEY]
    )
    keys = st.none() | st.sampled_from([SHARED_KEY, "wrong", f"Bearer {SHARED_KEY}"])
    bodies = {
        "/v1/messages": {
            "model": "",
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "a"}],
        },
        "/v1/responses": {"input": "a", "max_output_tokens": 1},
    }

    with httpx.Client(base_url=url, timeout=httpx.Timeout(30.0)) as http:

        @settings(max_examples=60, **SETTINGS)
        @given(
            st.sampled_from(list(bodies)),
            authorizations | HEADER,
            keys | HEADER,
        )
        def run(path, authorization, key):
            headers = {"Authorization": authorization} if authorization is not None else {}
            headers |= {"x-api-key": key} if key is not None else {}
            r = http.post(path, json=bodies[path], headers=headers)
            HISTOGRAM[r.status_code] += 1
            ok = authorization == f"Bearer {SHARED_KEY}" or key == SHARED_KEY
            assert r.status_code == (200 if ok else 401), f"{headers}: {r.status_code} {r.text}"
            if not ok and path == "/v1/messages":
                assert r.json()["error"]["type"] == "authentication_error"
            elif not ok:
                assert r.json()["error"]["message"]

        run()


def test_zz_same_answers_after_fuzzing(server, reference):
    for fuzzer in FUZZERS:
        if fuzzer not in FUZZED:
            fuzz(server, fuzzer)
    http, model, _ = server
    assert answers(http, model) == reference
    total = sum(HISTOGRAM.values())
    print(f"\nfuzzed requests: {total}")
    print("status histogram: " + ", ".join(f"{k}: {v}" for k, v in sorted(HISTOGRAM.items())))
    assert total >= 300, total
    assert HISTOGRAM[200] >= 40, HISTOGRAM  # enough of them valid to generate
