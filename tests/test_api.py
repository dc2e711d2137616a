"""The OpenAI-style API of a real 2-rank cluster, driven by the official `openai` client.

One cluster of tiny-r1 (R1's format and chat template) and one of SmolLM2 serve the whole module.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlx.core as mx
import openai
import pytest
from bad_requests import BAD, LONG
from mlx_lm import load
from mlx_lm.generate import generate_step

pytestmark = pytest.mark.cluster

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Served:
    url: str
    health: dict
    name: str
    client: openai.OpenAI


def _serve(shared) -> Served:
    url, health, _ = shared
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    return Served(url, health, health["model"], client)


@pytest.fixture(scope="module")
def r1(shared_r1):
    return _serve(shared_r1)  # tiny-r1 on [2, 2], shared with other files (conftest)


@pytest.fixture(scope="module")
def smol(shared_smollm2):
    return _serve(shared_smollm2)  # SmolLM2 on [15, 15], shared with test_cluster_equal


def prompt_ids(path: Path, messages: list[dict]) -> list[int]:
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(path)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def single_process_greedy(path: Path, prompt: list[int], max_tokens: int) -> str:
    """What one mlx-lm process generates, decoded as the server decodes it."""
    model, tokenizer = load(str(path))
    if "deepseek" in model.model_type:
        model.set_dtype(mx.float32)  # CPU expert matmul runs only in float32
    detok = tokenizer.detokenizer
    detok.reset()
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        if token in tokenizer.eos_token_ids:
            break
        detok.add_token(token)
    detok.finalize()
    return detok.text


def chat_whole(s: Served, messages: list[dict], **kw) -> tuple[str, str, object]:
    r = s.client.chat.completions.create(model=s.name, messages=messages, **kw)
    message = r.choices[0].message
    reasoning = (message.model_extra or {}).get("reasoning_content") or ""
    return reasoning, message.content or "", r


def chat_streamed(s: Served, messages: list[dict], **kw) -> tuple[str, str, object]:
    reasoning, content, usage, finish = [], [], None, None
    stream = s.client.chat.completions.create(
        model=s.name, messages=messages, stream=True, stream_options={"include_usage": True}, **kw
    )
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
            content.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert finish in ("stop", "length")
    return "".join(reasoning), "".join(content), usage


def raw_completion(s: Served, prompt: list[int], stream: bool = False, **kw) -> str:
    if not stream:
        return s.client.completions.create(model=s.name, prompt=prompt, **kw).choices[0].text
    chunks = s.client.completions.create(model=s.name, prompt=prompt, stream=True, **kw)
    return "".join(c.choices[0].text for c in chunks if c.choices)


def assert_split(raw: str, reasoning: str, content: str) -> None:
    """reasoning + "</think>" + content is the raw text, less the whitespace after the tag."""
    if "</think>" in raw:
        head, _, tail = raw.partition("</think>")
        assert (reasoning, content) == (head, tail.lstrip())
    else:
        assert (reasoning, content) == (raw, "")


# ---------------------------------------------------------------- equal outputs


def detokenized(path: Path, tokens: list[int]) -> str:
    """tokens decoded as the server decodes them."""
    from mlx_lm.utils import load_tokenizer

    detok = load_tokenizer(path).detokenizer
    detok.reset()
    for token in tokens:
        detok.add_token(token)
    detok.finalize()
    return detok.text


def test_smollm2_streamed_equals_whole_equals_single_process(smol, smollm2, smollm2_reference):
    tokens = 12
    # One mlx-lm process's greedy answer, to its end token or 16 tokens (conftest): its first 12.
    prompt, answer, _ = smollm2_reference
    assert prompt == prompt_ids(smollm2, QUESTION)
    expected = detokenized(smollm2, answer[:tokens])
    reasoning, whole, r = chat_whole(smol, QUESTION, max_tokens=tokens, temperature=0)
    _, streamed, usage = chat_streamed(smol, QUESTION, max_tokens=tokens, temperature=0)
    print(f"single process {expected!r}, API {whole!r}")
    assert "Paris" in expected
    assert whole == streamed == expected and reasoning == ""
    assert usage.completion_tokens == r.usage.completion_tokens <= tokens
    assert r.choices[0].finish_reason == "stop"  # the model's end-of-turn, before max_tokens
    assert usage.prompt_tokens == r.usage.prompt_tokens == len(prompt_ids(smollm2, QUESTION))


def test_tiny_r1_streamed_equals_whole_equals_single_process(r1, tiny_r1, tiny_r1_no_mtp):
    tokens = 32
    ids = prompt_ids(tiny_r1, QUESTION)
    expected = single_process_greedy(tiny_r1_no_mtp, ids, tokens)
    whole = chat_whole(r1, QUESTION, max_tokens=tokens, temperature=0)
    streamed = chat_streamed(r1, QUESTION, max_tokens=tokens, temperature=0)
    assert whole[:2] == streamed[:2]
    raw = raw_completion(r1, ids, max_tokens=tokens, temperature=0)
    assert raw == raw_completion(r1, ids, stream=True, max_tokens=tokens, temperature=0)
    assert raw == expected
    assert_split(raw, *whole[:2])
    details = whole[2].usage.completion_tokens_details
    assert details.reasoning_tokens == (
        tokens if "</think>" not in raw else details.reasoning_tokens
    )


def test_reasoning_and_content_split_on_r1_template(r1, tiny_r1):
    """R1's template ends the prompt inside <think>: what comes before </think> is reasoning.

    tiny-r1's random weights rarely close the block greedily; seeded sampling does, and is as
    repeatable, so the same request through /v1/completions gives the raw text to compare.
    """
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    ids = prompt_ids(tiny_r1, messages)
    assert r1.client is not None
    split_seen = False
    for seed in (32, 3, 9):
        params = {"max_tokens": 60, "temperature": 1.0, "seed": seed}
        raw = raw_completion(r1, ids, **params)
        reasoning, content, _ = chat_whole(r1, messages, **params)
        assert chat_streamed(r1, messages, **params)[:2] == (reasoning, content)
        assert_split(raw, reasoning, content)
        split_seen |= bool(reasoning and content)
        # reasoning_format "none": everything stays in content, as generated
        none = chat_whole(r1, messages, extra_body={"reasoning_format": "none"}, **params)
        assert none[:2] == ("", raw)
    assert split_seen, "no seed closed the think block: pick others"


# ---------------------------------------------------------------- queue and cancellation

TOPICS = ["apples", "rivers", "the sun", "bread", "lamps", "boats", "numbers", "rain"]


def test_eight_concurrent_streams_each_equal_its_solo_output(r1):
    conversations = [[{"role": "user", "content": f"Tell me about {t}."}] for t in TOPICS]
    params = {"max_tokens": 40, "temperature": 0}
    solo = [chat_whole(r1, c, **params)[:2] for c in conversations]
    start = threading.Barrier(len(conversations))

    def together(c):
        start.wait()
        return chat_streamed(r1, c, **params)[:2]

    with ThreadPoolExecutor(len(conversations)) as pool:
        together_out = list(pool.map(together, conversations, timeout=300))
    assert together_out == solo
    assert len(set(solo)) > 1, "different prompts should give different answers"


def _first_token_after(url: str, body: dict) -> tuple[float, dict]:
    """Seconds from sending a streamed request to its first token; and its last chunk."""
    t0 = time.perf_counter()
    first, last = None, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                last = json.loads(line[6:])
                delta = last["choices"][0]["delta"] if last["choices"] else {}
                if first is None and (delta.get("content") or delta.get("reasoning_content")):
                    first = time.perf_counter() - t0
    return first, last


def test_client_that_disconnects_frees_every_rank_at_once(r1):
    long = {
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 4000,
        "temperature": 0,
        "stream": True,
    }
    chunks, t0 = 0, time.perf_counter()
    with httpx.stream("POST", r1.url + "/v1/chat/completions", json=long, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                assert json.loads(line[6:])["choices"][0]["finish_reason"] is None
                chunks += 1
                if chunks == 50:
                    break  # leaving the block closes the connection mid-stream
    rate = chunks / (time.perf_counter() - t0)
    left = (4000 - chunks) / rate  # what the first request still had to run, at least
    short = long | {"messages": QUESTION, "max_tokens": 8}
    ttft, last = _first_token_after(r1.url, short)
    print(f"{rate:.0f} chunks/s; the long answer had >= {left:.1f} s to go; next TTFT {ttft:.3f} s")
    assert ttft is not None and ttft < min(3.0, left / 5)
    assert last["choices"][0]["finish_reason"] == "length"
    assert httpx.get(r1.url + "/health").json()["queued"] == 0


def test_client_that_gives_up_waiting_for_a_whole_answer_cancels_it(r1):
    long = {"messages": QUESTION, "max_tokens": 4000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(r1.url + "/v1/chat/completions", json=long, timeout=1.0)
    ttft, _ = _first_token_after(r1.url, long | {"max_tokens": 4, "stream": True})
    assert ttft is not None and ttft < 3.0


# ---------------------------------------------------------------- stop, usage, health


def test_stop_sequence_ends_the_answer_and_is_not_included(r1, tiny_r1):
    ids = prompt_ids(tiny_r1, QUESTION)
    raw = raw_completion(r1, ids, max_tokens=24, temperature=0)
    stop = raw[12:16]
    assert len(stop) == 4
    expected = raw[: raw.index(stop)]
    r = r1.client.completions.create(
        model=r1.name, prompt=ids, max_tokens=24, temperature=0, stop=[stop, "never seen"]
    )
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    streamed = raw_completion(r1, ids, stream=True, max_tokens=24, temperature=0, stop=stop)
    assert streamed == expected


def test_usage_only_when_asked_when_streaming(r1):
    chunks = list(
        r1.client.chat.completions.create(
            model=r1.name, messages=QUESTION, max_tokens=4, temperature=0, stream=True
        )
    )
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason
    _, _, r = chat_whole(r1, QUESTION, max_tokens=4, temperature=0)
    extra = r.usage.model_extra
    assert r.usage.completion_tokens == 4 and r.usage.total_tokens == r.usage.prompt_tokens + 4
    assert extra["time_to_first_token"] > 0 and extra["decode_tokens_per_second"] > 0


def test_health_and_models(r1):
    health = httpx.get(r1.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == r1.name
    assert health["ranks"] == 2 and health["plan"]["split"] == [2, 2]
    assert [n["layers"] for n in health["nodes"]] == [[0, 1], [2, 3]]
    assert all(n["host"] for n in health["nodes"]) and health["context"] == 4096
    assert [m.id for m in r1.client.models.list().data] == [r1.name]


# ---------------------------------------------------------------- bad requests


@pytest.mark.parametrize("what,endpoint,body,status,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_4xx_with_a_message(r1, what, endpoint, body, status, fragment):
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(r1.url + path, content=raw, headers={"Content-Type": "application/json"})
    error = r.json()["error"]
    print(what, r.status_code, error)
    assert r.status_code == status
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    # and the server goes on serving
    assert chat_whole(r1, QUESTION, max_tokens=2, temperature=0)[2].usage.completion_tokens == 2


def test_openai_client_raises_clean_errors(r1):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        r1.client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        r1.client.chat.completions.create(model=r1.name, messages=QUESTION, max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="context"):
        r1.client.chat.completions.create(model=r1.name, messages=LONG)
