"""The HTTP API in-process: create_app's FastAPI app through TestClient, a Coordinator around a
fake runner (tests/fakes.py), and tiny-r1's real tokenizer and chat template. No rank process.

The same logic test_api.py checks through a real cluster: answers whole and streamed, usage,
stop strings, end-of-sequence, errors in OpenAI's shape, /health, /v1/models, and failures.
"""

from __future__ import annotations

import contextlib
import json
import threading

import pytest
from bad_requests import BAD
from fakes import LOGITS_SIZE, FakeRunner, answer, next_token
from fastapi.testclient import TestClient
from mlx_lm.utils import load_tokenizer

from mlxdist.serving.api import Inflight, create_app
from mlxdist.serving.coordinator import Coordinator
from mlxdist.serving.reasoning import ReasoningSplitter

NAME = "tiny-r1"
VOCAB = 1024
INFO = {"ranks": 2, "parallel": "pipeline", "context": 4096, "vocab_size": VOCAB}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_r1):
    return load_tokenizer(tiny_r1)


@contextlib.contextmanager
def served(tokenizer, runner=None, eos: set[int] | None = None, inflight=None):
    """A TestClient of the app, its coordinator's loop on a thread of its own (as rank 0's)."""
    runner = runner or FakeRunner(2)
    eos = set(tokenizer.eos_token_ids) if eos is None else eos
    coordinator = Coordinator(runner, tokenizer, eos)
    loop = threading.Thread(target=coordinator.run, daemon=True)
    loop.start()
    try:
        with TestClient(create_app(coordinator, NAME, INFO, inflight)) as client:
            yield client
    finally:
        coordinator.shutdown()
        loop.join(10)
    assert not loop.is_alive()


@pytest.fixture(scope="module")
def client(tokenizer):
    with served(tokenizer) as c:
        yield c


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def decoded(tokenizer, ids: list[int]) -> str:
    detok = tokenizer.detokenizer
    detok.reset()
    for t in ids:
        detok.add_token(t)
    detok.finalize()
    return detok.text


def stream(client: TestClient, path: str, body: dict) -> list:
    """The bodies of a streamed answer's server-sent events, "[DONE]" as a string."""
    out = []
    with client.stream("POST", path, json=body | {"stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def streamed_chat(chunks: list) -> tuple[str, str, str | None, dict | None]:
    """(reasoning, content, finish reason, usage) of a streamed chat answer."""
    assert chunks[-1] == "[DONE]"
    bodies = chunks[:-1]
    assert bodies[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(b["object"] == "chat.completion.chunk" and b["model"] == NAME for b in bodies)
    reasoning = content = ""
    reason = usage = None
    for b in bodies:
        usage = b.get("usage") or usage
        for choice in b["choices"]:
            reasoning += choice["delta"].get("reasoning_content") or ""
            content += choice["delta"].get("content") or ""
            reason = choice["finish_reason"] or reason
    return reasoning, content, reason, usage


def split_whole(text: str, in_think: bool) -> tuple[str, str]:
    """(reasoning, content) of a whole answer, split as the server splits one."""
    splitter = ReasoningSplitter(in_think)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.finish()
    return r1 + r2, c1 + c2


def test_chat_whole_and_streamed_equal_the_models_answer(client, tokenizer):
    prompt = chat_ids(tokenizer, QUESTION)
    ids = answer(prompt, 12)
    expected = split_whole(decoded(tokenizer, ids), True)  # R1's template opens <think>
    body = {"model": NAME, "messages": QUESTION, "max_tokens": 12, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    whole = r.json()
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    [choice] = whole["choices"]
    message = choice["message"]
    assert message["role"] == "assistant"
    assert (message["reasoning_content"] or "", message["content"]) == expected
    assert choice["finish_reason"] == "length"
    usage = whole["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(prompt), 12)
    assert usage["total_tokens"] == len(prompt) + 12
    assert usage["time_to_first_token"] > 0 and usage["decode_tokens_per_second"] > 0
    assert usage["completion_tokens_details"]["reasoning_tokens"] <= 12
    options = {"stream_options": {"include_usage": True}}
    reasoning, content, reason, streamed_usage = streamed_chat(
        stream(client, "/v1/chat/completions", body | options)
    )
    assert (reasoning, content, reason) == (*expected, "length")
    assert streamed_usage["completion_tokens"] == 12
    assert streamed_usage["prompt_tokens"] == len(prompt)
    # reasoning_format "none": everything stays in content, as generated
    r = client.post("/v1/chat/completions", json=body | {"reasoning_format": "none"})
    assert r.json()["choices"][0]["message"]["content"] == decoded(tokenizer, ids)
    assert "reasoning_content" not in r.json()["choices"][0]["message"]


def test_completion_whole_and_streamed_equal_the_models_answer(client, tokenizer):
    prompt = tokenizer.encode("Once upon a time")
    ids = answer(prompt, 10)
    text = decoded(tokenizer, ids)
    for given in ("Once upon a time", prompt):
        body = {"prompt": given, "max_tokens": 10, "return_token_ids": True}
        whole = client.post("/v1/completions", json=body).json()
        assert whole["object"] == "text_completion" and whole["id"].startswith("cmpl-")
        [choice] = whole["choices"]
        assert (choice["text"], choice["token_ids"], choice["finish_reason"]) == (
            text,
            ids,
            "length",
        )
        assert choice["logprobs"] is None
        assert whole["usage"]["prompt_tokens"] == len(prompt)
        chunks = stream(client, "/v1/completions", body)
        assert chunks[-1] == "[DONE]"
        bodies = chunks[:-1]
        assert "".join(b["choices"][0]["text"] for b in bodies) == text
        assert [t for b in bodies for t in b["choices"][0].get("token_ids", [])] == ids
        assert bodies[-1]["choices"][0]["finish_reason"] == "length"
        assert all("usage" not in b for b in bodies)  # not asked for


def test_usage_only_when_asked_when_streaming(client):
    body = {"prompt": [5, 6, 7], "max_tokens": 4}
    asked = stream(client, "/v1/completions", body | {"stream_options": {"include_usage": True}})
    *_, last, done = asked
    assert done == "[DONE]" and last["choices"] == []
    assert last["usage"]["completion_tokens"] == 4 and last["usage"]["prompt_tokens"] == 3
    assert all(c.get("usage") is None for c in stream(client, "/v1/completions", body)[:-1])


def test_a_stop_string_ends_the_answer_and_is_not_included(client, tokenizer):
    prompt = [5, 6, 7]
    raw = decoded(tokenizer, answer(prompt, 24))
    stop = raw[12:16]
    assert len(stop) == 4 and raw.index(stop) >= 8
    expected = raw[: raw.index(stop)]
    body = {"prompt": prompt, "max_tokens": 24, "stop": [stop, "never seen"]}
    [choice] = client.post("/v1/completions", json=body).json()["choices"]
    assert (choice["text"], choice["finish_reason"]) == (expected, "stop")
    chunks = stream(client, "/v1/completions", body | {"stop": stop})[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_an_end_of_sequence_token_ends_the_answer_with_stop(tokenizer):
    prompt = [5, 6, 7]
    ids = answer(prompt, 10)
    assert ids[4] not in ids[:4]
    with served(tokenizer, eos={ids[4]}) as c:
        body = {"prompt": prompt, "max_tokens": 10, "return_token_ids": True}
        whole = c.post("/v1/completions", json=body).json()
        assert whole["choices"][0]["token_ids"] == ids[:4]
        assert whole["choices"][0]["finish_reason"] == "stop"
        assert whole["usage"]["completion_tokens"] == 4
        ignoring = c.post("/v1/completions", json=body | {"ignore_eos": True}).json()
        assert ignoring["choices"][0]["token_ids"] == ids
        assert ignoring["choices"][0]["finish_reason"] == "length"


def test_health_and_models(client):
    health = client.get("/health").json()
    assert health == {"status": "ok", "model": NAME, "queued": 0, **INFO}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"]) for m in models["data"]] == [(NAME, "model")]


def test_logits_and_stats(client):
    client.post("/v1/completions", json={"prompt": [5], "max_tokens": 2})
    r = client.post("/mlxdist/logits", json={"prompt": [1, 2, 3]})
    h = next_token([1, 2, 3])
    assert r.json() == {"logits": [float((h * (i + 1)) % 13) for i in range(LOGITS_SIZE)]}
    stats = client.get("/mlxdist/stats").json()
    assert set(stats) == {"ranks", "in_flight_peak"}
    assert [rank["rank"] for rank in stats["ranks"]] == [0, 1]
    assert stats["in_flight_peak"] == 1  # one answer at a time so far


@pytest.mark.parametrize("what,endpoint,body,status,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_4xx_in_openais_shape(client, what, endpoint, body, status, fragment):
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    # and the server goes on serving
    ok = client.post("/v1/completions", json={"prompt": [5], "max_tokens": 2})
    assert ok.json()["usage"]["completion_tokens"] == 2


def test_an_unknown_path_is_a_404_in_openais_shape(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_a_failing_step_is_a_server_error_and_the_server_goes_on(tokenizer):
    failures = []

    def fail_twice(runner, tokens, step):
        if len(failures) < 2:
            failures.append(step)
            raise RuntimeError("the ring broke")

    with served(tokenizer, FakeRunner(2, fail_twice)) as c:
        body = {"prompt": [5, 6, 7], "max_tokens": 4}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 500
        assert r.json()["error"] == {
            "message": "RuntimeError: the ring broke",
            "type": "server_error",
            "param": None,
            "code": None,
        }
        chunks = stream(c, "/v1/completions", body)
        assert chunks[-1] == "[DONE]"
        assert chunks[-2]["error"]["message"] == "RuntimeError: the ring broke"
        assert chunks[-2]["error"]["type"] == "server_error"
        ok = c.post("/v1/completions", json=body | {"return_token_ids": True}).json()
        assert ok["choices"][0]["token_ids"] == answer([5, 6, 7], 4)


def test_a_node_failure_fails_the_request_in_flight_and_refuses_new_ones(tokenizer):
    """rank.py's heartbeat calls Inflight.fail when a node fails: the answer under way ends with
    a 503 that names the node, and later requests are refused with it."""
    stepping, release = threading.Event(), threading.Event()

    def hang(runner, tokens, step):
        stepping.set()
        release.wait(30)  # as a rank stuck in a collective

    inflight = Inflight()
    message = "rank 1 on node b stopped answering"
    with served(tokenizer, FakeRunner(2, hang), inflight=inflight) as c:
        answers = []
        body = {"prompt": [5, 6, 7], "max_tokens": 4}
        asking = threading.Thread(
            target=lambda: answers.append(c.post("/v1/completions", json=body))
        )
        asking.start()
        assert stepping.wait(30)
        inflight.fail(message)
        asking.join(30)
        release.set()
        [r] = answers
        assert r.status_code == 503
        assert r.json()["error"] == {
            "message": message,
            "type": "server_error",
            "param": None,
            "code": "node_failed",
        }
        again = c.post("/v1/completions", json=body)
        assert again.status_code == 503 and again.json()["error"]["code"] == "node_failed"
