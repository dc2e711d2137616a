"""The dashboard's routes in-process (create_app through TestClient, a fake runner, tiny-r1's real
tokenizer): the page is open and its data behind the key, every refusal is an event, and an
answer's tokens and time to first token reach the board."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time

import pytest
from fakes import FakeRunner
from fastapi.testclient import TestClient
from mlx_lm.utils import load_tokenizer

from mlxdist.serving.api import create_app
from mlxdist.serving.coordinator import Coordinator
from mlxdist.serving.guard import Policy

KEY = "board-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
INFO = {
    "ranks": 2,
    "parallel": "pipeline",
    "context": 4096,
    "vocab_size": 1024,
    "nodes": [
        {"rank": 0, "host": "studio-1", "layers": [0, 1], "weights": 10, "peak_rss": 20},
        {"rank": 1, "host": "studio-2", "layers": [2, 3], "weights": 10, "peak_rss": 20},
    ],
}


@pytest.fixture(scope="module")
def client(tiny_r1):
    tokenizer = load_tokenizer(tiny_r1)
    coordinator = Coordinator(FakeRunner(2), tokenizer, set(tokenizer.eos_token_ids))
    loop = threading.Thread(target=coordinator.run, daemon=True)
    loop.start()
    policy = Policy(api_key=KEY, allowed_hosts=("testserver",))
    view = {"nodes": [{"name": "studio-2", "chip": "Apple M3 Ultra"}]}
    try:
        with TestClient(create_app(coordinator, "tiny-r1", INFO, None, policy, view)) as c:
            yield c
    finally:
        coordinator.shutdown()
        loop.join(10)


def events(client) -> list[dict]:
    return client.get("/mlxdist/state", headers=AUTH).json()["events"]


def test_the_page_is_open_and_strict(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    for rule in ("default-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"):
        assert rule in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert '<script type="module" src="/ui/app.js">' in page.text
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = client.get(f"/ui/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
    for bad in ("/ui/board.py", "/ui/.hidden.js", "/ui/%2e%2e%2fboard.py", "/ui/x.exe"):
        assert client.get(bad).status_code == 404, bad


def test_the_data_needs_the_key_and_each_refusal_is_an_event(client, monkeypatch):
    seconds = itertools.count(time.time() + 100, 2)  # refusals 2 s apart: each told alone
    monkeypatch.setattr(client.app.state.board, "clock", lambda: next(seconds))
    assert client.get("/mlxdist/state").status_code == 401
    assert client.get("/mlxdist/live").status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.get("/mlxdist/state", headers=wrong).status_code == 401
    assert client.get("/health", headers={"host": "evil.example"}).status_code == 400
    texts = [e["text"] for e in events(client) if e["kind"] == "refused"]
    assert "401 GET /mlxdist/state: no API key" in texts
    assert "401 GET /mlxdist/state: wrong API key" in texts
    assert any(t.startswith("400 GET /health: the Host header 'evil.example'") for t in texts)
    bad = client.post("/v1/chat/completions", headers=AUTH, json={"messages": "nope"})
    assert bad.status_code == 400
    assert events(client)[-1]["text"].startswith("400 POST /v1/chat/completions:")


def test_the_snapshot_has_the_nodes_and_the_launchers_view(client):
    state = client.get("/mlxdist/state", headers=AUTH).json()
    assert state["kind"] == "cluster" and state["model"]["name"] == "tiny-r1"
    assert [n["name"] for n in state["nodes"]] == ["studio-1", "studio-2"] == state["ring"]
    assert [n["chip"] for n in state["nodes"]] == [None, "Apple M3 Ultra"]
    assert [n["layers"] for n in state["nodes"]] == [[0, 1], [2, 3]]


def test_an_answer_counts_on_the_board(client):
    board = client.app.state.board
    before = board.tokens
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    with client.stream("POST", "/v1/chat/completions", headers=AUTH, json=body) as r:
        assert r.status_code == 200
        list(r.iter_lines())
    assert board.tokens - before == 5
    state = client.get("/mlxdist/state", headers=AUTH).json()
    last = state["ttft"][-1]
    assert last["tokens"] == 5 and last["ttft"] > 0


def test_the_live_feed_starts_with_the_state(client):
    with client.stream("GET", "/mlxdist/live", headers=AUTH) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines) == "event: state"
        data = next(lines)
        assert data.startswith("data: ")
        assert json.loads(data[6:])["model"]["name"] == "tiny-r1"
        with contextlib.suppress(Exception):
            r.close()
