"""The dashboard while the ranks load: each layer read is counted (stage.evaluate), a rank tells
rank 0 by its heartbeat (real sockets), rank 0's server answers the page and 503 to the rest
until the API takes over on the same socket, and the figures: bytes, rate, time left."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from launcher.hostfile import free_ports
from mlxdist.runtime import heartbeat, stage
from mlxdist.runtime.heartbeat import TOKEN_ENV, Follower, Monitor, _load_line
from mlxdist.serving.api.loading import LOADING, Switch, loading_app
from mlxdist.serving.dashboard import Board
from mlxdist.serving.dashboard.cluster import LoadingSample, load_figures, loading_static
from mlxdist.serving.guard import Policy


@pytest.mark.parametrize(
    "line, expect",
    [
        ("load 10 100\n", (10, 100)),
        ("load 0 0", (0, 0)),
        ("load 100 100", (100, 100)),
        ("load 101 100", None),  # more read than there is
        ("beat", None),
        ("load 1 2 3", None),
        ("load -1 2", None),
        ("load ١ ٢", None),  # digits of another script are not counts
        ("load 1 " + "9" * 19, None),  # past what a machine could hold
        ("load x y", None),
    ],
)
def test_load_lines(line, expect):
    assert _load_line(line) == expect


@pytest.mark.parametrize(
    "done, total, began, at, now, rate, eta",
    [
        (0, 1000, 5.0, 5.0, 5.0, 0.0, None),  # nothing read yet: no time left to say
        (500, 1000, 5.0, 7.0, 7.0, 250.0, 2.0),
        (500, 1000, 5.0, 7.0, 15.0, 50.0, 10.0),  # stalled since: slower, more time left
        (1000, 1000, 5.0, 9.0, 60.0, 250.0, 0.0),  # done: its rate stays what it was
    ],
)
def test_load_figures(done, total, began, at, now, rate, eta):
    figures = load_figures(done, total, began, at, now)
    assert figures["rate"] == pytest.approx(rate)
    assert figures["eta"] == (pytest.approx(eta) if eta is not None else None)
    assert (figures["done"], figures["total"]) == (done, total)


def test_a_rank_tells_its_loading_by_its_heartbeat(monkeypatch):
    left: list[str] = []  # the follower leaves this process only in a rank, never in pytest's
    monkeypatch.setattr(heartbeat, "_leave", lambda rank, why: left.append(why))
    monkeypatch.setenv(TOKEN_ENV, "b" * 32)
    port = free_ports(1)[0]
    monitor = Monitor(("127.0.0.1", port), 2, "mac0", lambda message: None).start()
    try:
        follower = Follower(("127.0.0.1", port), 1, "mac1")
        follower.loading(0, 4000)
        deadline = time.monotonic() + 5
        while 1 not in monitor.loads() and time.monotonic() < deadline:  # heard, then more
            time.sleep(0.05)
        time.sleep(0.2)
        follower.loading(3000, 4000)
        deadline = time.monotonic() + 5
        while monitor.loads().get(1, (0,))[0] != 3000 and time.monotonic() < deadline:
            time.sleep(0.05)
        done, total, began, at = monitor.loads()[1]
        assert (done, total) == (3000, 4000)
        assert at - began >= 0.15  # the first count's time is kept: the rate spans both
        sample = LoadingSample(["mac0", "mac1"], monitor.loads)()
        assert sample["nodes"]["mac1"]["load"]["eta"] > 0
        time.sleep(heartbeat.INTERVAL)  # rank 0 has beaten: the follower leaves when it goes
    finally:
        monitor.release()
    deadline = time.monotonic() + 10  # its thread is done before _leave is itself again
    while not left and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == ["rank 0 closed the heartbeat"]


def test_every_layer_read_is_counted(tiny_r1):
    told: list[tuple[int, int]] = []
    stage.on_load = lambda done, total: told.append((done, total))
    try:
        loaded = stage.load_stage(tiny_r1, [2, 2], 0)
    finally:
        stage.on_load = None
    total = loaded.nbytes()
    assert told[0] == (0, total) and told[-1] == (total, total)
    assert len(told) >= 4  # before, each of its 2 layers, and the rest
    assert [d for d, _ in told] == sorted(d for d, _ in told)


def test_the_server_while_loading_then_the_api():
    static = loading_static("r1", {"parallel": "pipeline", "split": [1, 1]}, None, ["a", "b"])
    assert [n["state"] for n in static["nodes"]] == ["loading", "loading"]
    board = Board("cluster", static)
    policy = Policy(api_key="k", allowed_hosts=("testserver",))
    switch = Switch(loading_app(board, policy))
    with TestClient(switch) as client:
        assert client.get("/").status_code == 200
        assert client.get("/mlxdist/state").status_code == 401  # the key still guards the data
        auth = {"Authorization": "Bearer k"}
        state = client.get("/mlxdist/state", headers=auth).json()
        assert [n["name"] for n in state["nodes"]] == ["a", "b"]
        assert client.get("/health").status_code == 503  # a launcher waits on
        r = client.post("/v1/chat/completions", headers=auth, json={"messages": []})
        assert r.status_code == 503 and r.json()["error"]["message"] == LOADING
        assert r.headers["retry-after"] == "5"

        async def api(scope, receive, send):  # what the API would answer
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"the api"})

        switch.app = api
        assert client.get("/health").text == "the api"
