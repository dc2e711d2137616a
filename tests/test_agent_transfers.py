"""What the agents' dashboard shows of fetches and pushes: the pure part (which transfer a node
card draws, its rate and time left from successive polls, the events when one starts, ends or
fails) from tables of polls, and the agent's GET /transfers over real signed HTTP, with a fetch
from the loopback Hub (tests/hub.py) and an upload stopped part-way."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time

import pytest
import uvicorn
from hub import running_hub
from huggingface_hub import constants

from launcher.agent import create_agent_app
from launcher.agent_client import AgentClient
from launcher.secret import create_secret, load_secret
from mlxdist.serving.dashboard.transfers import IDLE, NodeTransfers

REPO = "org/tiny"
FOLDER = "m/split-2-2/0"


def fetch(state, done, total, started=100.0, updated=None, error="", id="f1"):
    row = {"id": id, "repo": REPO, "revision": "main", "state": state, "done": done}
    return row | {"total": total, "started": started, "updated": updated or started, "error": error}


def upload(name, received, state="receiving", size=None, started=100.0, updated=None):
    row = {"path": f"{FOLDER}/{name}", "received": received, "state": state, "size": size}
    return row | {"started": started, "updated": updated or started, "error": ""}


def answer(t, fetches=(), uploads=()):
    """One poll's GET /transfers at agent time t."""
    return {"time": t, "fetches": list(fetches), "uploads": list(uploads)}


NONE = answer(100.0)

# (case, polls as (our clock, agent's answer), the last poll's "transfer" field, every event)
CASES = [
    (
        "a fetch: rate from the record's times, then from polls; events at start and end",
        [
            (0.0, NONE),
            (2.0, answer(102, [fetch("running", 100, 1000, 100.0, 102.0)])),  # 50 B/s so far
            (4.0, answer(104, [fetch("running", 300, 1000, 100.0, 104.0)])),  # 100 B/s
            (6.0, answer(106, [fetch("running", 700, 1000, 100.0, 106.0)])),  # 200 B/s
        ],
        {"kind": "fetch", "what": REPO, "done": 700, "total": 1000, "rate": 150.0, "eta": 2.0},
        [("info", "studio-2 fetches org/tiny from the Hub")],
    ),
    (
        "a fetch ends: the event says how much in how long, and the card has no bar",
        [
            (0.0, NONE),
            (2.0, answer(102, [fetch("running", 100, 1000)])),
            (4.0, answer(600, [fetch("done", 1000, 1000, 100.0, 580.0)])),
        ],
        None,
        [
            ("info", "studio-2 fetches org/tiny from the Hub"),
            ("info", "studio-2 fetched 1.00 kB of org/tiny in 8 min"),
        ],
    ),
    (
        "a fetch fails: a failed event with its error line",
        [
            (0.0, NONE),
            (2.0, answer(102, [fetch("starting", 0, 0)])),
            (4.0, answer(104, [fetch("failed", 0, 0, error="org/tiny@main has no x: wrong?")])),
        ],
        None,
        [
            ("info", "studio-2 fetches org/tiny from the Hub"),
            ("failed", "studio-2 could not fetch org/tiny: org/tiny@main has no x: wrong?"),
        ],
    ),
    (
        "what the first poll finds is not news; a fetch between two polls is (its end)",
        [
            (0.0, answer(100, [fetch("running", 10, 100, id="old")])),
            (2.0, answer(102, [fetch("running", 10, 100, id="old"), fetch("done", 5, 5, id="n")])),
        ],
        {"kind": "fetch", "what": REPO, "done": 10, "total": 100, "rate": 0.0, "eta": None},
        [("info", "studio-2 fetched 5 bytes of org/tiny in 0 s")],
    ),
    (
        "a push of two files is one push: drawn as its newest file (no size until whole)",
        [
            (0.0, NONE),
            (2.0, answer(102, [], [upload("a", 400, started=101.0, updated=102.0)])),
            (
                4.0,
                answer(
                    104,
                    [],
                    [
                        upload("a", 800, "done", 800, 101.0, 103.0),
                        upload("b", 200, started=103.0, updated=104.0),
                    ],
                ),
            ),
        ],
        {
            "kind": "push",
            "what": f"{FOLDER}/b",
            "done": 200,
            "total": None,
            "rate": 300.0,
            "eta": None,
        },
        [("info", f"studio-2 receives a push into {FOLDER}")],
    ),
    (
        "a push ends when its folder has had no byte for IDLE s: files and bytes said",
        [
            (0.0, NONE),
            (2.0, answer(102, [], [upload("a", 400)])),
            (
                4.0,
                answer(
                    100 + IDLE + 5,
                    [],
                    [
                        upload("a", 800, "done", 800, 100.0, 101.0),
                        upload("b", 50, "done", 50, 101.0, 102.0),
                    ],
                ),
            ),
        ],
        None,
        [
            ("info", f"studio-2 receives a push into {FOLDER}"),
            ("info", f"studio-2 received 2 files, 850 bytes, into {FOLDER} in 2 s"),
        ],
    ),
    (
        "a push whose launcher went away: stopped, with the bytes it got",
        [
            (0.0, NONE),
            (2.0, answer(102, [], [upload("a", 4000, updated=102.0)])),
            (4.0, answer(102 + IDLE + 1, [], [upload("a", 4000, updated=102.0)])),
        ],
        None,
        [
            ("info", f"studio-2 receives a push into {FOLDER}"),
            ("info", f"studio-2: the push of {FOLDER}/a stopped at 4.00 kB: no byte for 30 s"),
        ],
    ),
    (
        "a fetch and a push at once: the one started last is drawn",
        [
            (
                0.0,
                answer(
                    110,
                    [fetch("running", 5, 50, started=100.0, updated=110.0)],
                    [upload("a", 7, started=105.0, updated=109.0)],
                ),
            ),
        ],
        {
            "kind": "push",
            "what": f"{FOLDER}/a",
            "done": 7,
            "total": None,
            "rate": None,
            "eta": None,
        },
        [],
    ),
    (
        "an agent older than GET /transfers (none), and the end of what was watched: quiet",
        [
            (0.0, NONE),
            (2.0, answer(102, [fetch("running", 1, 10)])),
            (4.0, None),
        ],
        None,
        [("info", "studio-2 fetches org/tiny from the Hub")],
    ),
]


@pytest.mark.parametrize("case,polls,shown,events", CASES, ids=[c[0] for c in CASES])
def test_transfer_shown_and_events(case, polls, shown, events):
    watch = NodeTransfers("studio-2")
    said = []
    for now, reply in polls:
        got, new = watch.step(reply, now)
        said += new
    if shown is None:
        assert got is None
    else:
        state = {"fetch": "running", "push": "receiving"}[shown["kind"]]
        assert got == shown | {"state": state}
    assert said == events


# ---- the agent's route, over real signed HTTP ----


@contextlib.contextmanager
def serving(app):
    """The agent's app on a loopback port, in this process (so it fetches from the test Hub)."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.mark.cluster
def test_agent_lists_its_fetches_and_uploads(tmp_path, monkeypatch):
    """A fetch from the loopback Hub and an upload stopped part-way: GET /transfers shows both
    with their bytes, never the token; the dashboard's watch reads them as a node card would."""
    token = "hf_" + "k3y" * 10
    weights = bytes(range(256)) * 12_000  # 3 MB: several blocks of the agent's download
    files = {"config.json": b'{"model_type": "x"}', "model.safetensors": weights}
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    secret = load_secret(create_secret(tmp_path / "secret"))
    app = create_agent_app(
        secret,
        tmp_path / "models",
        lambda: {"hostname": "studio-2"},
        runs_dir=tmp_path / "runs",
        node_id="n-1",
    )
    watch = NodeTransfers("studio-2")
    with running_hub({REPO: files}) as hub, serving(app) as url:
        # As HF_ENDPOINT would set them when huggingface_hub is imported.
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        with AgentClient(url, secret, timeout=10) as client:
            assert (
                client.transfers()["fetches"] == [] and watch.step(client.transfers(), 0)[1] == []
            )
            rel = f"{FOLDER}/model-1.safetensors"
            client.request(
                "PUT", "/files/chunk", params={"path": rel, "offset": 0}, content=b"x" * 5000
            )
            client.request(
                "PUT", "/files/chunk", params={"path": rel, "offset": 5000}, content=b"y" * 2000
            )
            started = client.fetch_start(REPO, list(files), token=token)
            deadline = time.monotonic() + 20
            while client.fetch_status(started["id"])["state"] not in ("done", "failed"):
                assert time.monotonic() < deadline, "the fetch did not end"
                time.sleep(0.05)
            raw = client.request("GET", "/transfers")
            shown, said = watch.step(raw, 2.0)
            digest = hashlib.sha256(b"x" * 5000 + b"y" * 2000).hexdigest()
            client.request(
                "POST", "/files/complete", body={"path": rel, "size": 7000, "sha256": digest}
            )
            [done] = client.transfers()["uploads"]
            finished = {k: done[k] for k in ("path", "received", "size", "state")}
    assert token not in json.dumps(raw) and token not in json.dumps(said)
    total = sum(map(len, files.values()))
    [f] = raw["fetches"]
    assert f["id"] == started["id"] and f["repo"] == REPO and f["revision"] == "main"
    assert (f["state"], f["done"], f["total"], f["error"]) == ("done", total, total, "")
    assert f["started"] <= f["updated"] <= raw["time"]
    [u] = raw["uploads"]
    assert (u["path"], u["received"], u["size"], u["state"]) == (rel, 7000, None, "receiving")
    assert u["started"] <= u["updated"] <= raw["time"]
    assert shown == {
        "kind": "push",
        "what": rel,
        "done": 7000,
        "total": None,
        "rate": None,
        "eta": None,
        "state": "receiving",
    }
    fetched, pushed = sorted(said, key=lambda e: "receives" in e[1])
    assert pushed == ("info", f"studio-2 receives a push into {FOLDER}")
    assert fetched[0] == "info"
    assert fetched[1].startswith(f"studio-2 fetched {total / 1e6:.2f} MB of {REPO} in ")
    assert finished == {"path": rel, "received": 7000, "size": 7000, "state": "done"}


def test_agents_board_gets_the_transfer_and_its_events():
    """The agents' dashboard: each poll's figure goes to the node, its events to the board; a
    poll the agent did not answer keeps the figure as it was."""
    from mlxdist.serving.dashboard.agents import Agents
    from mlxdist.serving.dashboard.board import Board

    board = Board("agents", {"nodes": [{"name": "studio-2", "state": "idle"}]})
    agents = Agents(board, "home", [], b"s" * 32, 1.0)
    assert agents._transfer("n-1", "studio-2", NONE) == {"transfer": None}
    running = answer(102, [fetch("running", 100, 1000, 100.0, 102.0)])
    figure = agents._transfer("n-1", "studio-2", running)["transfer"]
    assert (figure["kind"], figure["done"], figure["total"], figure["rate"]) == (
        "fetch",
        100,
        1000,
        50.0,
    )
    assert agents._transfer("n-1", "studio-2", None) == {"transfer": figure}
    said = [(e["kind"], e["text"], e["node"]) for e in board.snapshot()["events"]]
    assert said == [("info", "studio-2 fetches org/tiny from the Hub", "studio-2")]
