"""The page in a real headless Chromium against a Board of six Mac Studios running R1 in expert
mode, as a launcher's view and the ranks' figures would make it (served by the real routes over
real HTTP; no ranks): what a person with six Macs on their desk would see. The cards name each
node's experts, the drawing its Thunderbolt 5 cables with RDMA, long names stay inside a narrow
window, and a failure reaches the page as a banner and a red node."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import uvicorn
from browser import chromium, console_problems, shot, wait_for
from fastapi import FastAPI

from mlxdist.serving.dashboard import Board, add_dashboard
from mlxdist.serving.dashboard.cluster import cluster_static

GB = 2**30
NAMES = [f"mac-studio-{i}-in-the-rack-by-the-window.local" for i in range(6)]
EXPERTS = [list(range(r * 43, min(256, (r + 1) * 43))) for r in range(6)]  # 256 over 6
INFO = {
    "parallel": "expert",
    "backend": "jaccl",
    "split": None,
    "model_type": "deepseek_v3",
    "context": 32768,
    "nodes": [
        {
            "rank": r,
            "host": name,
            "layers": [0, 60],
            "experts": EXPERTS[r],
            "weights": 60 * GB,
            "peak_rss": 64 * GB,
        }
        for r, name in enumerate(NAMES)
    ],
}
VIEW = {
    "nodes": [
        {
            "name": name,
            "chip": "Apple M3 Ultra",
            "memory_total": 192 * GB,
            "memory_usable": 144 * GB,
            "wired_limit": 144 * GB,
        }
        for name in NAMES
    ],
    "cables": [
        {"a": a, "b": b, "generation": "Thunderbolt 5", "rdma": True}
        for i, a in enumerate(NAMES)
        for b in NAMES[i + 1 :]
    ],
    "plan": {"predicted_tps": 21.5, "link": "tb5-rdma"},
}
pytestmark = pytest.mark.cluster  # a browser and a server, though no rank


@contextlib.contextmanager
def serve(board: Board, port: int = 0):
    app = FastAPI()
    add_dashboard(app, board)
    sock = socket.create_server(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:  # as a rank 0 that exits: its open feeds end with it
        server.should_exit = server.force_exit = True
        thread.join(5)


def _text(driver, css: str) -> str:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".map(e => e.textContent).join('\\n')",
        css,
    )


def test_six_macs_in_expert_mode():
    board = Board("cluster", cluster_static("DeepSeek-R1-0528", INFO, VIEW))
    board.sample = lambda: {"running": 1, "waiting": 2}
    with chromium() as driver:
        with serve(board) as url:
            driver.get(url + "/")
            wait_for(lambda: _text(driver, "#nodes [data-node]"), 20, "the node cards")
            cards = _text(driver, "#nodes [data-node]")
            assert "experts 0–42 (43) of every layer" in cards
            assert "experts 215–255 (41) of every layer" in cards
            assert cards.count("Apple M3 Ultra") == 6
            assert "144 GB usable" in cards  # 1024-based, as a Mac reports its memory
            drawing = _text(driver, "#ring")
            assert drawing.count("RDMA") >= 5, drawing  # each ring link, at least, is labelled
            assert "predicted 21.5 tok/s" in _text(driver, "header")
            shot(driver, "dashboard_page", "six-macs")

            board.fail(f"rank 3 on node {NAMES[3]} failed: no heartbeat for 5 s (hung)")
            wait_for(lambda: driver.find_element("id", "alert").is_displayed(), 10, "the banner")
            assert NAMES[3] in driver.find_element("id", "alert").text
            failed = driver.execute_script(
                "return document.querySelector('#nodes [data-state=failed]')?.dataset.node"
            )
            assert failed == NAMES[3]

            driver.set_window_size(360, 900)
            time.sleep(0.5)
            wide = driver.execute_script(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert wide <= 0, f"{wide} px wider than a 360 px window"
            shot(driver, "dashboard_page", "six-macs-narrow")
            driver.set_window_size(1280, 900)
        # The cluster planned again on the five left: a new server at the same address.
        five = INFO | {"nodes": [n for n in INFO["nodes"] if n["rank"] != 3]}
        again = Board("cluster", cluster_static("DeepSeek-R1-0528", five, VIEW))
        with serve(again, int(url.rsplit(":", 1)[1])):
            replan = wait_for(
                lambda: _text(driver, "#events [data-kind=replan]"), 20, "the replan event"
            )
            assert "5 nodes" in replan, replan
            wait_for(lambda: _text(driver, "#nodes").count("Apple M3 Ultra") == 5, 10, "5 cards")
            assert _text(driver, "#events [data-kind=failed]")  # the failure stays told
            shot(driver, "dashboard_page", "six-macs-replanned")
        problems = [p for p in console_problems(driver) if "Content Security Policy" in p]
        assert not problems, problems


def test_agents_before_a_launch_with_a_fetch_under_way():
    """status --web's page: agents with no model, one fetching its share from the Hub."""
    fetch = {"kind": "fetch", "what": "mlx-community/DeepSeek-R1-4bit", "state": "running"}
    fetch |= {"done": 12 * GB, "total": 60 * GB, "rate": 1.1 * GB, "eta": 44.0}
    nodes = [
        {"name": name, "rank": None, "chip": "Apple M3 Ultra", "memory_total": 192 * GB}
        | {"state": "idle", "transfer": fetch if i == 1 else None}
        for i, name in enumerate(NAMES[:3])
    ]
    board = Board("agents", {"nodes": nodes, "cables": VIEW["cables"][:3], "ring": NAMES[:3]})
    with serve(board) as url, chromium() as driver:
        driver.get(url + "/")
        wait_for(lambda: _text(driver, "#nodes .transfer"), 20, "the fetch's progress")
        line = _text(driver, f'#nodes [data-node="{NAMES[1]}"] .transfer')
        assert "fetch mlx-community/DeepSeek-R1-4bit" in line and "44 s left" in line, line
        assert _text(driver, "#nodes .transfer").count("fetch") == 1
        assert not driver.find_element("id", "chat").is_displayed()  # no model: no chat
        shot(driver, "dashboard_page", "agents-fetching")
