"""The dashboard in a real headless Chromium, on a real `mlxdist serve` of SmolLM2 on 3 ranks
behind an API key: the page asks for the key and loads nothing without it, then shows the three
nodes with their layers and memory; a question typed in the chat streams an answer while the
speed plot gains points; a killed rank is named on the page within 15 s. No request leaves the
server's origin. A screenshot of each state is written to test-output/dashboard/."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time

import httpx
import pexpect
import psutil
import pytest
from browser import chromium, console_problems, requested_urls, shot, wait_for
from conftest import ROOT, rank_pids

from launcher.hostfile import free_ports

KEY = "dashboard-test-key-5821"
FOLDER = "dashboard"
pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def served(smollm2, tmp_path_factory):
    """`mlxdist serve` of SmolLM2 on 3 local ranks with an API key: (url, the model's copy)."""
    model = tmp_path_factory.mktemp("dashboard") / "smollm2"
    shutil.copytree(smollm2, model, copy_function=os.link)  # its ranks are told apart by path
    port = free_ports(1)[0]
    args = ["-m", "mlxdist.cli", "serve", str(model), "--local", "3", "--split", "10,10,10"]
    args += ["--port", str(port), "--api-key", KEY, "--parallel", "pipeline"]
    server = pexpect.spawn(sys.executable, args, cwd=str(ROOT), encoding="utf-8", timeout=240)
    try:
        server.expect(r"serving smollm2 at (http://127\.0\.0\.1:\d+)/v1")
        yield server.match.group(1), model
    finally:
        server.close(force=True)


def _rank_pid(model, rank: int) -> int:
    for pid in rank_pids(str(model) + " "):
        if psutil.Process(pid).environ().get("MLX_RANK") == str(rank):
            return pid
    raise AssertionError(f"no rank {rank} process of {model}")


def _text(driver, css: str) -> str:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".map(e => e.textContent).join('\\n')",
        css,
    )


def _count(driver, css: str) -> int:
    return driver.execute_script("return document.querySelectorAll(arguments[0]).length", css)


def _points(driver, plot: str) -> int:
    value = driver.execute_script(
        "const s = document.querySelector(arguments[0] + ' svg') || "
        "document.querySelector(arguments[0]); return s && s.getAttribute('data-points')",
        plot,
    )
    return int(value or 0)


def test_the_data_routes_need_the_key(served):
    url, _ = served
    assert httpx.get(url + "/").status_code == 200  # the page itself, to ask for the key
    for path in ("/mlxdist/state", "/mlxdist/live"):
        assert httpx.get(url + path).status_code == 401
        assert httpx.get(url + path, headers={"Authorization": "Bearer nope"}).status_code == 401
    for path in ("/ui/%2e%2e%2fboard.py", "/ui/..%2fboard.py", "/ui/board.py", "/ui/none.js"):
        assert httpx.get(url + path).status_code == 404, path  # only the page's own files
    assert httpx.get(url + "/ui/../routes.py").status_code == 401  # the client made it /routes.py
    state = httpx.get(url + "/mlxdist/state", headers={"Authorization": f"Bearer {KEY}"}).json()
    loads = [n["load"] for n in state["nodes"]]  # each rank's loading, told while it loaded
    assert all(0 < load["done"] == load["total"] for load in loads), loads
    assert sum(load["total"] for load in loads) == sum(n["weights"] for n in state["nodes"])
    page = httpx.get(url + "/ui/app.js")
    assert page.status_code == 200 and "javascript" in page.headers["content-type"]
    assert "connect-src 'self'" in page.headers["content-security-policy"]


def test_the_page_of_a_three_rank_cluster(served):
    url, model = served
    with chromium() as driver:
        driver.get(url + "/")
        # With the key set, the page asks for it, and nothing of the cluster loads without it.
        dialog = wait_for(lambda: driver.find_element("id", "key-dialog"), 15, "the key dialog")
        wait_for(dialog.is_displayed, 15, "the key dialog shown")
        time.sleep(1.0)  # whatever the page would load, it has asked for by now
        assert _count(driver, "[data-node]") == 0
        assert "smollm2" not in driver.find_element("tag name", "body").text
        shot(driver, FOLDER, "1-asks-for-the-key")
        driver.find_element("id", "key-input").send_keys("wrong-key")
        driver.find_element("id", "key-submit").click()
        wait_for(lambda: driver.find_element("id", "key-error").is_displayed(), 10, "refused key")
        assert _count(driver, "[data-node]") == 0
        key_input = driver.find_element("id", "key-input")
        key_input.clear()
        key_input.send_keys(KEY + "\n")  # the keyboard submits the form

        # Three nodes, each with its layers and memory.
        wait_for(lambda: _count(driver, "#nodes [data-node]") == 3, 20, "three node cards")
        cards = _text(driver, "#nodes [data-node]")
        for layers in ("0–9", "10–19", "20–29"):
            assert f"layers {layers}" in cards, cards
        assert len(re.findall(r"\d+(\.\d+)? [MG]B", cards)) >= 3, cards
        assert _count(driver, "#ring [data-node]") == 3
        assert "smollm2" in driver.find_element("tag name", "body").text
        shot(driver, FOLDER, "2-three-nodes")

        # A question typed in the chat streams an answer; the speed plot gains points meanwhile.
        before = _points(driver, "#plot-tps")
        most = driver.find_element("id", "chat-max")
        most.clear()
        most.send_keys("40")  # at a few tokens a second on this CPU: a few seconds of stream
        box = driver.find_element("id", "chat-input")
        box.send_keys("What is the capital of France?")
        box.send_keys("\n")  # Enter sends
        grown = wait_for(lambda: len(_text(driver, ".answer .answer-text")) > 0, 60, "a first word")
        assert grown
        first = _text(driver, ".answer .answer-text")
        wait_for(lambda: len(_text(driver, ".answer .answer-text")) > len(first), 60, "more words")
        assert driver.find_element("id", "chat-stop").is_enabled()  # while it streams
        wait_for(lambda: _points(driver, "#plot-tps") >= before + 2, 60, "speed plot points")
        shot(driver, FOLDER, "3-chat-streams")
        wait_for(lambda: _text(driver, ".answer .answer-figures"), 120, "the answer's figures")
        assert "tok/s" in _text(driver, ".answer .answer-figures")
        assert "Paris" in _text(driver, ".answer .answer-text")

        # A narrow window: one column, nothing wider than the screen.
        driver.set_window_size(390, 900)
        time.sleep(0.5)
        wide = driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert wide <= 0, f"the page is {wide} px wider than a 390 px window"
        shot(driver, FOLDER, "4-narrow")
        driver.set_window_size(1280, 900)

        # A rank killed: the page names the failed node within 15 s.
        name = re.search(r"\S+ #2", _text(driver, "#nodes [data-node]"))
        os.kill(_rank_pid(model, 2), signal.SIGKILL)
        killed = time.monotonic()
        failed = wait_for(
            lambda: _text(driver, "#events [data-kind=failed]"), 15, "the failed node named"
        )
        assert time.monotonic() - killed < 15
        assert "rank 2" in failed
        if name:  # a node of its own name on the page (ranks on one machine: "host #2")
            assert name.group(0) in failed
        state = driver.execute_script(
            "return document.querySelector('#nodes [data-node][data-state=failed]')"
            "?.getAttribute('data-node')"
        )
        assert state is not None and state.endswith("#2")
        shot(driver, FOLDER, "5-node-failed")

        # Every request the page made went to its own origin.
        origin = url.rstrip("/")
        urls = requested_urls(driver, origin)
        assert urls, "the performance log holds the page's requests"
        strangers = [u for u in urls if not u.startswith(origin + "/")]
        assert not strangers, strangers
        problems = [p for p in console_problems(driver) if "Content Security Policy" in p]
        assert not problems, problems
