"""The dashboard's state without a cluster: the snapshot's make-up from the ranks' figures and
the launcher's view, ticks, events, failures, and the pages' feeds."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from mlxdist.serving.dashboard.board import (
    PAGE_QUEUE,
    PAGES,
    REFUSALS,
    Board,
    TooManyPages,
    sse,
)
from mlxdist.serving.dashboard.cluster import clean_view, cluster_static, node_names


@pytest.mark.parametrize(
    "hosts, names",
    [
        (["a", "b", "c"], ["a", "b", "c"]),
        (["vm", "vm", "vm"], ["vm #0", "vm #1", "vm #2"]),  # one machine: ranks told apart
        (["a", "b", "a"], ["a #0", "b", "a #2"]),
        ([], []),
    ],
)
def test_node_names_are_unique(hosts, names):
    assert node_names(hosts) == names


INFO = {
    "parallel": "pipeline",
    "backend": "ring",
    "split": [30, 31],
    "model_type": "deepseek_v3",
    "context": 4096,
    "nodes": [
        {"rank": 1, "host": "studio-2", "layers": [30, 60], "weights": 200, "peak_rss": 250},
        {"rank": 0, "host": "studio-1", "layers": [0, 29], "weights": 100, "peak_rss": 150},
    ],
}
VIEW = {
    "nodes": [
        {"name": "studio-1", "chip": "Apple M3 Ultra", "memory_total": 512, "address": "10.0.0.1"},
        {"name": "studio-2", "chip": "Apple M3 Ultra", "memory_total": 512, "wired_limit": 400},
        {"name": "elsewhere", "chip": "Apple M4 Max"},
    ],
    "cables": [
        {"a": "studio-1", "b": "studio-2", "generation": "Thunderbolt 5", "rdma": True},
        {"a": "studio-1", "b": "elsewhere", "generation": "Thunderbolt 4", "rdma": False},
    ],
    "plan": {"predicted_tps": 21.5, "link": "tb5-rdma"},
}


@pytest.mark.parametrize(
    "view, expect",
    [
        (  # no view: the ranks' own figures, in rank order
            None,
            {
                "names": ["studio-1", "studio-2"],
                "chips": [None, None],
                "cables": 0,
                "plan": (None, None),
            },
        ),
        (  # the launcher's view: chips, memory, only the cables between the cluster's nodes
            VIEW,
            {
                "names": ["studio-1", "studio-2"],
                "chips": ["Apple M3 Ultra", "Apple M3 Ultra"],
                "cables": 1,
                "plan": (21.5, "tb5-rdma"),
            },
        ),
        (  # one machine: its facts on every rank
            {"machine": {"chip": "Apple M2 Max", "memory_total": 96}},
            {
                "names": ["studio-1", "studio-2"],
                "chips": ["Apple M2 Max", "Apple M2 Max"],
                "cables": 0,
                "plan": (None, None),
            },
        ),
    ],
)
def test_cluster_static(view, expect):
    static = cluster_static("r1", INFO, view)
    nodes = static["nodes"]
    assert [n["name"] for n in nodes] == expect["names"] == static["ring"]
    assert [n["chip"] for n in nodes] == expect["chips"]
    assert [n["layers"] for n in nodes] == [[0, 29], [30, 60]]
    assert [n["memory_used"] for n in nodes] == [150, 250]
    assert len(static["cables"]) == expect["cables"]
    plan = static["plan"]
    assert (plan["predicted_tps"], plan["link"]) == expect["plan"]
    assert (plan["parallel"], plan["backend"], plan["split"]) == ("pipeline", "ring", [30, 31])
    assert static["model"] == {"name": "r1", "model_type": "deepseek_v3", "context": 4096}
    json.dumps(static)  # it goes out as JSON as it is


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_tick_measures_tokens_per_second_and_keeps_node_figures():
    clock = Clock()
    board = Board("cluster", cluster_static("r1", INFO, None), clock=clock)
    board.sample = lambda: {"running": 2, "waiting": 1, "nodes": {"studio-2": {"state": "x"}}}
    for _ in range(30):
        board.token()
    clock.now += 2.0
    board.update_nodes({"studio-1": {"bytes_per_token": 7168.0}})
    tick = board.tick()
    assert tick["tps"] == pytest.approx(15.0)
    assert (tick["running"], tick["waiting"], tick["tokens"]) == (2, 1, 30)
    assert tick["nodes"] == {"studio-1": {"bytes_per_token": 7168.0}, "studio-2": {"state": "x"}}
    assert tick["ttft"] == []
    board.answer(0.5, 20.0, 12)
    clock.now += 1.0
    assert [a["ttft"] for a in board.tick()["ttft"]] == [0.5]  # each answer in one tick only
    clock.now += 1.0
    assert board.tick()["tps"] == 0.0  # nothing generated in that second
    assert board.tick()["ttft"] == []
    snap = board.snapshot()
    assert [n.get("bytes_per_token") for n in snap["nodes"]] == [7168.0, None]
    assert snap["nodes"][1]["state"] == "x"
    assert len(snap["series"]) == 4 and snap["live"] == snap["series"][-1]


def test_a_failure_names_and_marks_its_node():
    board = Board("cluster", cluster_static("r1", INFO, None))
    board.fail("rank 1 on node studio-2 failed: its connection was lost")
    snap = board.snapshot()
    assert [n["state"] for n in snap["nodes"]] == ["ready", "failed"]
    event = snap["events"][-1]
    assert (event["kind"], event["node"]) == ("failed", "studio-2")
    assert "studio-2" in event["text"]
    board.fail("something failed without a rank")  # still an event, no node marked
    assert board.snapshot()["events"][-1]["node"] is None


def test_sse_messages_are_one_json_line():
    text = sse("event", {"text": "two\nlines"})
    assert text.startswith("event: event\ndata: ") and text.endswith("\n\n")
    assert json.loads(text.split("data: ", 1)[1]) == {"text": "two\nlines"}
    assert text.count("\n") == 3


def test_a_page_gets_the_state_then_what_happens():
    async def run():
        board = Board("cluster", cluster_static("r1", INFO, None))
        feed = board.stream()
        first = await anext(feed)
        assert first.startswith("event: state\n")
        assert json.loads(first.split("data: ", 1)[1])["instance"] == board.instance
        board.event("refused", "401 GET /mlxdist/state")
        board.set_static({"ring": ["studio-2", "studio-1"]})
        second, third = await anext(feed), await anext(feed)
        assert second.startswith("event: event\n") and "401" in second
        assert third.startswith("event: state\n")
        assert json.loads(third.split("data: ", 1)[1])["ring"] == ["studio-2", "studio-1"]
        await feed.aclose()
        assert not board._pages

    asyncio.run(run())


def test_pages_are_bounded_and_a_page_that_falls_behind_is_dropped():
    async def run():
        board = Board("agents")
        feeds = [board.stream() for _ in range(PAGES)]
        for feed in feeds:
            await anext(feed)
        with pytest.raises(TooManyPages):
            await anext(board.stream())
        for _ in range(PAGE_QUEUE + 5):  # no page reads: each falls behind
            board.event("info", "x")
        await asyncio.sleep(0.05)  # the loop hands the messages over
        assert not board._pages  # all dropped, their queues bounded
        messages = [m async for m in feeds[0]]
        assert len(messages) <= PAGE_QUEUE  # then its feed ends: the page reconnects
        for feed in feeds[1:]:
            await feed.aclose()

    asyncio.run(run())


def test_refusals_are_bounded_and_never_push_out_a_failure():
    clock = Clock()
    board = Board("cluster", cluster_static("r1", INFO, None), clock=clock)
    board.fail("rank 1 on node studio-2 failed: its connection was lost")
    for i in range(1000):  # a stranger's flood of requests without the key
        clock.now += 0.001
        board.refused(f"401 GET /v1/models?{i}: no API key")
    events = board.snapshot()["events"]
    assert [e["kind"] for e in events] == ["failed", "refused"]  # one told, the rest held
    clock.now += 1.0
    board.tell_held_refusals()
    last = board.snapshot()["events"][-1]
    assert (
        last["text"]
        == "999 more refused in the last seconds; the last: 401 GET /v1/models?999: no API key"
    )
    for i in range(200):  # a slow flood, one a second: only the refusals' own ring fills
        clock.now += 1.0
        board.refused(f"401 {i}")
    events = board.snapshot()["events"]
    assert events[0]["kind"] == "failed" and len(events) == 1 + REFUSALS


def test_the_failure_is_in_every_page_before_wait_idle_returns():
    async def run():
        board = Board("cluster", cluster_static("r1", INFO, None))
        feed = board.stream()
        await anext(feed)
        loop = asyncio.get_running_loop()
        # From the heartbeat's thread while the loop is busy: wait_idle waits for the hand-over.
        waited = loop.run_in_executor(
            None, lambda: (board.fail("rank 1 failed"), board.wait_idle(5))
        )
        time.sleep(0.3)  # the loop blocked: the message cannot be handed over yet
        await asyncio.sleep(0)
        message = await asyncio.wait_for(anext(feed), 5)
        assert message.startswith("event: event") and "rank 1 failed" in message
        _, idle = await waited
        assert idle

    asyncio.run(run())


@pytest.mark.parametrize(
    "view, expect",
    [
        ([1, 2], None),
        ("text", None),
        ({}, {"nodes": [], "cables": [], "ring": [], "plan": {}, "machine": {}}),
        (  # wrong shapes dropped, part by part
            {
                "nodes": [1, {"chip": "x"}, {"name": "a", "memory_total": "lots", "rank": 0}],
                "cables": [{"a": "a"}, {"a": "a", "b": "b", "rdma": "yes", "generation": 5}],
                "ring": ["a", 3, "b" * 300],
                "plan": {"predicted_tps": True, "split": [1, "2"], "parallel": "pipeline"},
                "machine": [],
            },
            {
                "nodes": [{"name": "a", "rank": 0}],
                "cables": [{"a": "a", "b": "b"}],
                "ring": ["a"],
                "plan": {"parallel": "pipeline"},
                "machine": {},
            },
        ),
        (VIEW, VIEW | {"ring": [], "machine": {}}),  # a well-formed view as it is
    ],
)
def test_clean_view(view, expect):
    assert clean_view(view) == expect
    if expect is not None:
        cluster_static("r1", INFO, clean_view(view))  # the snapshot takes whatever it left
