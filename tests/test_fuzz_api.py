"""The OpenAI-style API of a real 2-rank tiny-r1 cluster, fuzzed with hypothesis.

Valid-looking and invalid JSON bodies (tools, tool calls and results, logprobs, logit_bias,
penalties, response formats with schemas llguidance takes or refuses included), token-id prompts
past the vocabulary, and raw non-JSON bytes: the server never answers 5xx, every refusal is one
line in OpenAI's error shape, and afterwards it still generates exactly what it did before.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.cluster

HISTOGRAM: Counter[int] = Counter()
BY_PATH: Counter[tuple[str, int]] = Counter()
REFERENCE_PROMPT = [1, 2, 3, 4, 5]
SETTINGS = dict(
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def server(shared_r1):
    started = time.monotonic()
    url, health, _ = shared_r1  # tiny-r1 on [2, 2], shared with other files (conftest)
    with httpx.Client(base_url=url, timeout=httpx.Timeout(30.0)) as http:
        yield http, health
    print(f"\nfuzzed for {time.monotonic() - started:.0f}s")


def greedy(http: httpx.Client) -> tuple[list[int], str]:
    body = {"prompt": REFERENCE_PROMPT, "max_tokens": 8, "temperature": 0.0}
    r = http.post("/v1/completions", json=body | {"return_token_ids": True})
    r.raise_for_status()
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
    c = http.post("/v1/chat/completions", json=chat)
    c.raise_for_status()
    return r.json()["choices"][0]["token_ids"], c.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def reference(server):
    return greedy(server[0])


def post(http: httpx.Client, path: str, content: bytes, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = http.post(path, content=content, headers=headers)
    HISTOGRAM[r.status_code] += 1
    BY_PATH[path, r.status_code] += 1
    where = f"{path} {content[:300]!r}"
    assert r.status_code < 500, f"{where}: {r.status_code} {r.text[:500]}"
    anthropic = path.startswith("/v1/messages")
    if r.status_code >= 400:  # an error in the API's shape, one line
        body = r.json()
        if anthropic:
            assert body["type"] == "error", f"{where}: {r.text[:500]}"
            assert set(body["error"]) == {"type", "message"}, f"{where}: {r.text[:500]}"
        else:
            assert set(body["error"]) == {"message", "type", "param", "code"}, f"{where}: {body}"
        assert "\n" not in body["error"]["message"], f"{where}: {body}"
    if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
        failed = ("api_error", "overloaded_error") if anthropic else ("server_error",)
        assert not any(f in r.text for f in failed), f"{where}: {r.text[:500]}"


def post_json(http: httpx.Client, path: str, body) -> None:
    post(http, path, json.dumps(body, allow_nan=True).encode(), "application/json")


# --- strategies ------------------------------------------------------------------------------


def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """valid about four times in five: whole requests are then often valid."""
    return st.sampled_from([valid] * 4 + [invalid]).flatmap(lambda s: s)


def often(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """valid nine times in ten, for the many newer fields: a request still often passes."""
    return st.sampled_from([valid] * 9 + [invalid]).flatmap(lambda s: s)


HUGE = st.one_of(
    st.integers(min_value=2**31, max_value=2**80), st.integers(max_value=-1, min_value=-(2**80))
)
ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | HUGE
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
# A max_tokens that is refused or small: nothing accepted generates more than 3 tokens.
LIMIT = mostly(
    st.integers(0, 3),
    st.one_of(
        st.integers(max_value=-1),
        st.floats(allow_nan=True),
        st.text(max_size=3),
        st.booleans(),
        st.lists(st.integers(0, 3), max_size=2),
    ),
)
# Anthropic's max_tokens and Responses' max_output_tokens start at 1
LIMIT_1 = often(st.integers(1, 3), st.sampled_from([0, -1, 1.5, "2", True]) | ANY_JSON)
TEXT = st.text(max_size=40) | st.sampled_from(["", "<think>", "</think>", "\u202e\u0000\ufeff"])


def sampling(vocab: int, model: str) -> dict:
    return dict(
        model=mostly(st.sampled_from([None, "", model]), st.sampled_from(["gpt-4"]) | ANY_JSON),
        temperature=mostly(st.floats(0.0, 2.0), st.sampled_from([-1.0, 2.5, 1e308]) | ANY_JSON),
        top_p=mostly(st.floats(0.01, 1.0), st.sampled_from([0.0, -0.5, 1.5]) | ANY_JSON),
        seed=mostly(st.integers(0, 2**31 - 1), HUGE | ANY_JSON),
        stop=mostly(st.none() | TEXT | st.lists(TEXT, max_size=4), st.lists(TEXT) | ANY_JSON),
        n=mostly(st.just(1), st.sampled_from([2, 0, -1]) | ANY_JSON),
        stream=mostly(st.booleans(), ANY_JSON),
        stream_options=mostly(
            st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}), ANY_JSON
        ),
        return_token_ids=mostly(st.booleans(), ANY_JSON),
        max_completion_tokens=mostly(st.integers(0, 3), HUGE | ANY_JSON),
        logit_bias=often(
            st.dictionaries(st.integers(0, vocab - 1).map(str), st.floats(-100, 100), max_size=3),
            st.dictionaries(
                st.sampled_from(["-1", str(vocab), "x", "1.5", " 7", "²"]) | st.text(max_size=3),
                st.floats(allow_nan=True) | ANY_JSON,
                max_size=3,
            )
            | ANY_JSON,
        ),
        presence_penalty=often(st.floats(-2, 2), st.sampled_from([-2.5, 3.0]) | ANY_JSON),
        frequency_penalty=often(st.floats(-2, 2), st.sampled_from([-2.5, 3.0]) | ANY_JSON),
        repetition_penalty=often(st.floats(0.5, 2), st.sampled_from([0.0, -1.0]) | ANY_JSON),
        response_format=often(RESPONSE_FORMATS, ANY_JSON),
    )


def json_schema(name, schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


SCHEMAS = st.sampled_from(
    [
        {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]},
        {"type": "object", "properties": {"b": {"enum": ["x", "y"]}}},
        {"type": "array", "items": {"type": "integer"}, "maxItems": 2},
        {"type": "string", "pattern": "(?=a)a"},  # look-around: refused by name
        {"$ref": "https://example.com/schema.json"},  # external: refused
        {"type": "nothing"},
        {},
    ]
)
RESPONSE_FORMATS = st.one_of(
    st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "xml"}]),
    st.builds(
        lambda schema, name: {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema},
        },
        SCHEMAS | ANY_JSON,
        st.text(max_size=8),
    ),
    st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": ANY_JSON}),
)
TOOL = st.fixed_dictionaries(
    {
        "type": mostly(st.just("function"), ANY_JSON),
        "function": mostly(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["get_weather", "f", "", "a b", "x" * 80])},
                optional={
                    "description": TEXT,
                    "parameters": mostly(SCHEMAS, ANY_JSON),
                    "strict": st.booleans(),
                },
            ),
            ANY_JSON,
        ),
    }
)
TOOL_CHOICES = st.one_of(
    st.sampled_from(["auto", "none", "required", "any", None]),
    st.builds(
        lambda name: {"type": "function", "function": {"name": name}},
        st.sampled_from(["get_weather", "f", "missing"]),
    ),
    ANY_JSON,
)


def bodies(
    optional: dict, required: dict, limit: str = "max_tokens", limits: st.SearchStrategy = LIMIT
) -> st.SearchStrategy:
    """Dicts with the required keys mostly present, any subset of the optional ones, and a
    max_tokens (or the API's `limit` field) that keeps every accepted request short."""

    def drop_some(d: dict, keep: list[bool]) -> dict:
        return {k: v for (k, v), kept in zip(d.items(), keep) if kept}

    req = st.fixed_dictionaries(required)
    req = st.tuples(
        req, st.lists(st.sampled_from([True] * 9 + [False]), min_size=len(required))
    ).map(lambda t: drop_some(*t))  # roughly 1 in 10 misses each required field
    return st.builds(
        lambda r, o, n, extra: {**extra, **o, **r, limit: n},
        req,
        st.fixed_dictionaries({}, optional=optional),
        limits,
        st.dictionaries(st.text(max_size=6), ANY_JSON, max_size=2),
    )


def prompts(vocab: int) -> st.SearchStrategy:
    ids = st.one_of(
        st.integers(0, vocab - 1),
        st.sampled_from([vocab, vocab + 1, -1, -vocab, 2**31, 2**63, -(2**63)]),
        HUGE,
    )
    valid = st.lists(st.integers(0, vocab - 1), min_size=1, max_size=12)
    invalid = st.one_of(
        st.lists(ids, max_size=12),
        st.lists(st.floats() | st.text(max_size=2) | st.booleans(), max_size=3),
        ANY_JSON,
    )
    return st.sampled_from([valid, TEXT, invalid]).flatmap(lambda s: s)


def messages() -> st.SearchStrategy:
    role = st.sampled_from(["system", "developer", "user", "assistant", "tool", "", "USER"])
    part = st.fixed_dictionaries(
        {
            "type": mostly(st.just("text"), st.sampled_from(["image_url", 1])),
            "text": mostly(TEXT, ANY_JSON),
        }
    )
    content = mostly(TEXT | st.lists(part, max_size=3), st.none() | ANY_JSON)
    call = st.fixed_dictionaries(
        {
            "id": mostly(st.text(max_size=8), ANY_JSON),
            "type": mostly(st.just("function"), ANY_JSON),
            "function": mostly(
                st.fixed_dictionaries(
                    {
                        "name": mostly(st.sampled_from(["get_weather", "f"]), ANY_JSON),
                        "arguments": mostly(
                            st.sampled_from(['{"city": "Paris"}', "{}", "{not json", "[]"]),
                            ANY_JSON,
                        ),
                    }
                ),
                ANY_JSON,
            ),
        }
    )
    message = mostly(
        st.fixed_dictionaries(
            {"role": mostly(role, ANY_JSON), "content": content},
            optional={
                "tool_calls": mostly(st.lists(call, max_size=2), ANY_JSON),
                "tool_call_id": mostly(st.text(max_size=8), ANY_JSON),
            },
        ),
        ANY_JSON,
    )
    return mostly(
        st.lists(message, min_size=1, max_size=4), st.lists(message, max_size=0) | ANY_JSON
    )


RAW = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [
            b"",
            b"{",
            b"null",
            b"[]",
            b"[" * 5000,
            b'{"prompt": [1, 2' * 10,
            b'{"prompt": "\\ud800", "max_tokens": 1}',
            b'{"prompt": "a\\udfff", "max_tokens": 1}',
            b'{"messages": [{"role": "user", "content": "\\ud83d"}], "max_tokens": 1}',
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}],'
            b' "max_tokens": 1}',
            b'{"prompt": [1], "max_tokens": 1, "stop": ["\\ud800"]}',
            b'{"prompt": [1], "max_tokens": 1, "model": "\\ud800"}',
            b'{"prompt": [1], "max_tokens": 1, "\\ud800": "\\udfff"}',
            b'{"prompt": [1], "max_tokens": 1, "stream": true, "stop": "\\ud800"}',
            b'{"prompt": [1], "max_tokens": 1, "temperature": NaN}',
            b'{"prompt": [1], "max_tokens": 1, "top_p": Infinity}',
            b'{"prompt": [1], "max_tokens": 1e400}',
            b'{"prompt": [1e400], "max_tokens": 1}',
            b"\xef\xbb\xbf{}",
            b'{"prompt": [1], "max_tokens": 1}\x00',
        ]
    ),
)
CONTENT_TYPES = st.sampled_from(
    [None, "application/json", "text/plain", "application/x-www-form-urlencoded", "a/b+json"]
)


def anthropic_messages() -> st.SearchStrategy:
    text = st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})
    use = st.fixed_dictionaries(
        {
            "type": st.just("tool_use"),
            "id": st.sampled_from(["toolu_1", ""]),
            "name": st.sampled_from(["get_weather", ""]),
            "input": often(st.just({"city": "Paris"}), ANY_JSON),
        }
    )
    result = st.fixed_dictionaries(
        {
            "type": st.just("tool_result"),
            "tool_use_id": st.sampled_from(["toolu_1", "nope"]),
            "content": often(TEXT | st.lists(text, max_size=2), ANY_JSON),
        },
        optional={"is_error": st.booleans()},
    )
    thinking = st.fixed_dictionaries(
        {"type": st.just("thinking"), "thinking": TEXT, "signature": st.text(max_size=8)}
    )
    other = st.sampled_from([{"type": "image"}, {"type": "redacted_thinking", "data": "x"}])
    block = often(text | use | result | thinking | other, ANY_JSON)
    message = st.fixed_dictionaries(
        {
            "role": often(st.sampled_from(["user", "assistant"]), ANY_JSON),
            "content": often(TEXT | st.lists(block, min_size=1, max_size=3), ANY_JSON),
        }
    )
    return often(st.lists(message, min_size=1, max_size=4), ANY_JSON)


def anthropic_fields(model: str) -> dict:
    tool = st.fixed_dictionaries(
        {"name": st.sampled_from(["get_weather", "f", "", "a b"])},
        optional={"description": TEXT, "input_schema": often(SCHEMAS, ANY_JSON)},
    )
    choice = st.fixed_dictionaries(
        {"type": st.sampled_from(["auto", "any", "tool", "none", "all"])},
        optional={"name": st.sampled_from(["get_weather", "missing"])},
    )
    thinking = st.fixed_dictionaries(
        {"type": st.sampled_from(["enabled", "disabled", "adaptive", "off"])},
        optional={"budget_tokens": st.integers(-1, 2048)},
    )
    return dict(
        system=often(
            TEXT
            | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2),
            ANY_JSON,
        ),
        temperature=often(st.floats(0.0, 1.0), st.sampled_from([-1.0, 1.5]) | ANY_JSON),
        top_p=often(st.floats(0.01, 1.0), ANY_JSON),
        stop_sequences=often(st.lists(TEXT, max_size=3), ANY_JSON),
        stream=often(st.booleans(), ANY_JSON),
        tools=often(st.lists(tool, max_size=2), ANY_JSON),
        tool_choice=often(choice, ANY_JSON),
        thinking=often(thinking, ANY_JSON),
        output_config=often(
            st.fixed_dictionaries(
                {"format": st.builds(lambda sc: {"type": "json_schema", "schema": sc}, SCHEMAS)}
            ),
            ANY_JSON,
        ),
        metadata=often(st.just({"user_id": "u"}), ANY_JSON),
    )


def responses_input() -> st.SearchStrategy:
    part = st.fixed_dictionaries(
        {"type": st.sampled_from(["input_text", "output_text", "input_image"]), "text": TEXT}
    )
    message = st.fixed_dictionaries(
        {
            "role": often(st.sampled_from(["user", "assistant", "system", "developer"]), ANY_JSON),
            "content": often(TEXT | st.lists(part, max_size=2), ANY_JSON),
        },
        optional={"type": st.just("message")},
    )
    call = st.fixed_dictionaries(
        {
            "type": st.just("function_call"),
            "call_id": st.sampled_from(["call_1", ""]),
            "name": st.sampled_from(["get_weather", ""]),
            "arguments": st.sampled_from(['{"city": "Paris"}', "{bad", "[]"]),
        }
    )
    output = st.fixed_dictionaries(
        {
            "type": st.just("function_call_output"),
            "call_id": st.sampled_from(["call_1", "nope"]),
            "output": often(TEXT, ANY_JSON),
        }
    )
    reasoning = st.fixed_dictionaries(
        {
            "type": st.just("reasoning"),
            "summary": st.just([]),
            "content": st.lists(
                st.fixed_dictionaries({"type": st.just("reasoning_text"), "text": TEXT}), max_size=1
            ),
        }
    )
    item = often(message | call | output | reasoning, ANY_JSON)
    return st.one_of(TEXT, st.lists(item, min_size=1, max_size=4), ANY_JSON)


def responses_fields(model: str) -> dict:
    tool = st.fixed_dictionaries(
        {
            "type": often(st.just("function"), ANY_JSON),
            "name": st.sampled_from(["get_weather", "f", ""]),
        },
        optional={"parameters": often(SCHEMAS, ANY_JSON), "strict": st.booleans()},
    )
    named = st.fixed_dictionaries(
        {"type": st.just("function"), "name": st.sampled_from(["get_weather", "missing"])}
    )
    return dict(
        model=often(st.sampled_from([None, model]), ANY_JSON),
        instructions=often(TEXT, ANY_JSON),
        temperature=often(st.floats(0.0, 2.0), ANY_JSON),
        stream=often(st.booleans(), ANY_JSON),
        tools=often(st.lists(tool, max_size=2), ANY_JSON),
        tool_choice=often(st.sampled_from(["auto", "none", "required"]) | named, ANY_JSON),
        text=often(st.fixed_dictionaries({"format": RESPONSE_FORMATS.map(_flat)}), ANY_JSON),
        reasoning=often(
            st.fixed_dictionaries({"effort": st.sampled_from(["low", "high", "max"])}), ANY_JSON
        ),
        store=often(st.booleans(), ANY_JSON),
        previous_response_id=often(st.none() | st.sampled_from(["resp_nope", ""]), ANY_JSON),
    )


def _flat(fmt):
    """Chat's response_format as the Responses API writes text.format (the schema at the top)."""
    if isinstance(fmt, dict) and isinstance(fmt.get("json_schema"), dict):
        return {"type": fmt["type"], **fmt["json_schema"]}
    return fmt


# --- the tests -------------------------------------------------------------------------------


def fuzz_completions(http: httpx.Client, health: dict) -> None:
    vocab, model = health["vocab_size"], health["model"]
    required = {"prompt": prompts(vocab)}
    optional = sampling(vocab, model) | {
        "logprobs": often(st.integers(0, 5) | st.none(), st.sampled_from([6, -1]) | ANY_JSON)
    }

    @settings(max_examples=350, **SETTINGS)
    @given(bodies(optional, required))
    def run(body):
        post_json(http, "/v1/completions", body)

    run()


def fuzz_chat(http: httpx.Client, health: dict) -> None:
    vocab, model = health["vocab_size"], health["model"]
    optional = sampling(vocab, model) | {
        "reasoning_format": st.sampled_from(["deepseek", "none", "other"]) | ANY_JSON,
        "logprobs": often(st.booleans(), ANY_JSON),
        "top_logprobs": often(st.integers(0, 20) | st.none(), st.sampled_from([21, -1]) | ANY_JSON),
        "tools": often(st.lists(TOOL, max_size=2), ANY_JSON),
        "tool_choice": TOOL_CHOICES,
        "parallel_tool_calls": often(st.booleans(), ANY_JSON),
    }

    @settings(max_examples=350, **SETTINGS)
    @given(bodies(optional, {"messages": messages()}))
    def run(body):
        post_json(http, "/v1/chat/completions", body)

    run()


def fuzz_anthropic(http: httpx.Client, health: dict) -> None:
    model = health["model"]
    required = {"model": often(st.just(model), ANY_JSON), "messages": anthropic_messages()}
    path = st.sampled_from(["/v1/messages"] * 4 + ["/v1/messages/count_tokens"])

    @settings(max_examples=150, **SETTINGS)
    @given(path, bodies(anthropic_fields(model), required, limits=LIMIT_1))
    def run(where, body):
        post_json(http, where, body)

    run()


def fuzz_responses(http: httpx.Client, health: dict) -> None:
    model = health["model"]

    @settings(max_examples=150, **SETTINGS)
    @given(
        bodies(responses_fields(model), {"input": responses_input()}, "max_output_tokens", LIMIT_1)
    )
    def run(body):
        post_json(http, "/v1/responses", body)

    run()


def fuzz_any_json_and_raw_bodies(http: httpx.Client, health: dict) -> None:
    path = st.sampled_from(
        [
            "/v1/completions",
            "/v1/chat/completions",
            "/mlxdist/logits",
            "/v1/messages",
            "/v1/responses",
        ]
    )

    @settings(max_examples=350, **SETTINGS)
    @given(
        path,
        st.one_of(ANY_JSON.map(lambda v: ("json", v)), RAW.map(lambda b: ("raw", b))),
        CONTENT_TYPES,
    )
    def run(where, body, content_type):
        kind, value = body
        if kind == "json":
            if isinstance(value, dict) and where != "/mlxdist/logits":
                value["max_tokens"] = 1  # a random dict may be a valid request: keep it short
                value["max_output_tokens"] = 1
            if where == "/mlxdist/logits" and isinstance(value, dict):
                value.pop("prompt", None)  # logits of arbitrary valid prompts is tested elsewhere
            post(http, where, json.dumps(value, allow_nan=True).encode(), content_type)
        else:
            post(http, where, value, content_type)

    run()


HEADER = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)
# (Host, is it foreign): random text may name this server or not; these are known
HOSTS = st.sampled_from(
    [("127.0.0.1", False), ("localhost", False), ("[::1]", False), ("LOCALHOST.", False)]
    + [("evil.example", True), ("127.0.0.1.nip.io", True), ("", True), ("[::2]", True)]
) | HEADER.map(lambda h: (h, None))


def fuzz_guard_headers(http: httpx.Client, health: dict) -> None:
    """Host, Authorization and Origin headers (docs/security.md): a foreign Host is 400, a
    loopback one is served, nothing is 5xx, and no answer carries a CORS header (the fuzzed
    server names no origin; with no key, any Authorization is let through)."""
    port = http.base_url.port

    @settings(max_examples=150, **SETTINGS)
    @given(HOSTS, st.booleans(), st.none() | HEADER, st.none() | HEADER, st.booleans())
    def run(host, with_port, authorization, origin, chat):
        name, foreign = host
        headers = {"Host": f"{name}:{port}" if with_port and name else name}
        headers |= {"Authorization": authorization} if authorization is not None else {}
        headers |= {"Origin": origin} if origin is not None else {}
        if chat:
            body = {"prompt": REFERENCE_PROMPT, "max_tokens": 1}
            r = http.post("/v1/completions", json=body, headers=headers)
        else:
            r = http.get("/v1/models", headers=headers)
        HISTOGRAM[r.status_code] += 1
        assert r.status_code < 500, f"{headers}: {r.status_code} {r.text[:300]}"
        assert not any(k.lower().startswith("access-control-") for k in r.headers), r.headers
        if foreign is not None:
            assert (r.status_code == 400) == foreign, f"{headers}: {r.status_code} {r.text}"

    run()


FUZZERS = [
    fuzz_completions,
    fuzz_chat,
    fuzz_anthropic,
    fuzz_responses,
    fuzz_any_json_and_raw_bodies,
    fuzz_guard_headers,
]
FUZZED: set = set()  # the fuzzers run to the end against the module's cluster so far


def fuzz(server, fuzzer) -> None:
    fuzzer(*server)
    FUZZED.add(fuzzer)


def test_fuzz_completions(server, reference):
    fuzz(server, fuzz_completions)


def test_fuzz_chat(server, reference):
    fuzz(server, fuzz_chat)


def test_fuzz_anthropic(server, reference):
    fuzz(server, fuzz_anthropic)


def test_fuzz_responses(server, reference):
    fuzz(server, fuzz_responses)


def test_fuzz_any_json_and_raw_bodies(server, reference):
    fuzz(server, fuzz_any_json_and_raw_bodies)


def test_fuzz_guard_headers(server, reference):
    fuzz(server, fuzz_guard_headers)


def test_zz_same_answer_after_fuzzing(server, reference):
    """Holds alone and in any order: first runs every fuzzer that has not yet run to the end
    against the module's cluster (all three when run alone), then asks again."""
    for fuzzer in FUZZERS:
        if fuzzer not in FUZZED:
            fuzz(server, fuzzer)
    http, health = server
    assert http.get("/health").json()["status"] == "ok"
    assert greedy(http) == reference
    total = sum(HISTOGRAM.values())
    print(f"\nfuzzed requests: {total}")
    print("status histogram: " + ", ".join(f"{k}: {v}" for k, v in sorted(HISTOGRAM.items())))
    print("by path: " + ", ".join(f"{p} {k}: {v}" for (p, k), v in sorted(BY_PATH.items())))
    assert total >= 1300, total
