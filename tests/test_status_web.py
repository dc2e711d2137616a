"""`mlxdist status --cluster NAME --web` over three stand-in Macs: agents in network namespaces,
each with the facts of a captured Mac Studio (tests/data/macos/studio-1..3, cabled in a ring:
one Thunderbolt 5 cable, two Thunderbolt 4). The real CLI serves the dashboard in a fourth
namespace; its port is brought out here (tests/netns_port.py) for the HTTP checks and a headless
Chromium. One start of everything serves every test; the last one stops an agent."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time

import httpx
import pytest
from conftest import ROOT
from netns import available, bridged_hosts
from netns_port import forwarded
from test_cluster_hosts import Machine, cli, start_agents, stop_agents

from launcher.agent_client import AgentClient, AgentError
from launcher.hostfacts import FACTS_FROM_ENV
from launcher.secret import load_secret

WHY_NOT = available()
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(WHY_NOT is not None, reason=f"needs network namespaces: {WHY_NOT}"),
]

MACOS = ROOT / "tests" / "data" / "macos"
MACS = ["studio-1", "studio-2", "studio-3"]  # their host names are their folders'
PORT = 8090  # status --web's default, inside the launcher's namespace
GiB = 2**30


class Web:
    def __init__(self, machines, agents, proc, base, env, work):
        self.machines, self.agents, self.proc = machines, agents, proc
        self.base, self.env, self.work = base, env, work

    def state(self) -> dict:
        r = httpx.get(self.base + "/mlxdist/state", timeout=5)
        assert r.status_code == 200, r.text
        return r.json()

    def nodes(self) -> dict[str, dict]:
        return {n["name"]: n for n in self.state()["nodes"]}


def _wait_line(proc: subprocess.Popen, timeout: float) -> str:
    """The CLI's first line on stdout (it prints it once it serves)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"status --web printed no line within {timeout} s") from None
    assert line, f"status --web exited: {proc.stderr.read()}"
    return line.rstrip("\n")


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    work = tmp_path_factory.mktemp("web")
    env = dict(os.environ, MLXDIST_CONFIG=str(work / "launcher"))
    subprocess.run(cli("init"), env=env, cwd=ROOT, check=True, capture_output=True)
    with bridged_hosts(4) as hosts:
        machines = [Machine(h.name, h.ip, 52417) for h in hosts]
        facts = [{FACTS_FROM_ENV: str(MACOS / mac)} for mac in MACS]
        agents = start_agents(machines[1:], "eth0", work, ["web"] * 3, facts.__getitem__)
        args = ["status", "--cluster", "web", "--interface", "eth0", "--web"]
        proc = subprocess.Popen(
            machines[0].cmd(*cli(*args, "--port", str(PORT))),
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = _wait_line(proc, 60)
            assert line == f"dashboard of cluster web at http://127.0.0.1:{PORT}/ (Ctrl-C stops)"
            with forwarded(machines[0].name, PORT) as port:
                yield Web(machines, agents, proc, f"http://127.0.0.1:{port}", env, work)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            stop_agents(agents)


def test_state_shows_every_agent_with_its_chip_memory_and_cables(web):
    state = web.state()
    assert state["kind"] == "agents" and state["model"] is None and state["plan"] is None
    nodes = {n["name"]: n for n in state["nodes"]}
    assert sorted(nodes) == MACS
    # as the captures' sysctl give them: two 512 GiB M3 Ultras and a 192 GiB M2 Ultra
    assert nodes["studio-1"]["chip"] == nodes["studio-2"]["chip"] == "Apple M3 Ultra"
    assert nodes["studio-3"]["chip"] == "Apple M2 Ultra"
    assert nodes["studio-1"]["memory_total"] == 512 * GiB
    assert nodes["studio-3"]["memory_total"] == 192 * GiB
    for i, name in enumerate(MACS):
        node = nodes[name]
        assert node["address"] == web.machines[i + 1].ip
        assert node["state"] == "idle" and node["ranks"] == [] and node["rank"] is None
        assert 0 < node["memory_used"] < node["memory_total"]  # total less the capture's available
    assert state["cables"] == [
        {"a": "studio-1", "b": "studio-2", "generation": "Thunderbolt 5", "rdma": False},
        {"a": "studio-1", "b": "studio-3", "generation": "Thunderbolt 4", "rdma": False},
        {"a": "studio-2", "b": "studio-3", "generation": "Thunderbolt 4", "rdma": False},
    ]
    assert state["ring"] == MACS


def test_the_live_feed_sends_the_state_then_ticks(web):
    events, ticks, seen = [], [], set()
    with httpx.stream("GET", web.base + "/mlxdist/live", timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[len("data: ") :])))
                ticks = [d for k, d in events if k == "tick"]
                # each agent's memory and state, read every 2 s, ride on the next tick
                seen = {name for t in ticks for name in t["nodes"]}
                if (len(ticks) >= 2 and seen == set(MACS)) or len(ticks) == 6:
                    break
    first, data = events[0]
    assert first == "state" and sorted(n["name"] for n in data["nodes"]) == MACS
    assert ticks[1]["t"] > ticks[0]["t"] and ticks[0]["tps"] == 0
    assert seen == set(MACS), ticks
    figures = next(t["nodes"]["studio-3"] for t in ticks if "studio-3" in t["nodes"])
    assert figures["state"] == "idle" and figures["memory_used"] > 0


def test_an_agent_refuses_a_view_that_is_not_a_json_object(web):
    """The agent behind the page takes a rank's view only as JSON text of an object: 400 and
    one line, and no rank starts."""
    secret = load_secret(web.work / "launcher" / "secret")
    with forwarded(web.machines[1].name, 52417, web.machines[1].ip) as port:
        client = AgentClient(f"http://127.0.0.1:{port}", secret)
        base = {"model": "tiny", "split": [4], "rank": 0, "http_host": "127.0.0.1"}
        base |= {"http_port": 18080, "name": "tiny"}
        for view, said in (("[1]", "JSON object"), ("{nope", "JSON text")):
            with pytest.raises(AgentError) as e:
                client.start_rank(**base, view=view)
            assert e.value.status == 400 and said in str(e.value)
        assert client.ranks() == []


def test_the_page_draws_the_agents_and_their_cables(web):
    from browser import chromium, console_problems, requested_urls, shot, wait_for

    def names(driver, selector: str, attribute: str = "node") -> list[str]:
        # read in one go: the page redraws its nodes on every tick
        script = (
            "return [...document.querySelectorAll(arguments[0])].map(e => e.dataset[arguments[1]])"
        )
        return sorted(driver.execute_script(script, selector, attribute))

    with chromium() as driver:
        driver.get(web.base + "/")
        wait_for(lambda: len(names(driver, "#ring [data-node]")) == 3, 20, "three nodes drawn")
        assert names(driver, "#ring [data-node]") == MACS
        assert names(driver, "#nodes [data-node]") == MACS
        links = {frozenset(k.split()) for k in names(driver, "#ring [data-link]", "link")}
        assert links == {frozenset(c) for c in (MACS[:2], MACS[::2], MACS[1:])}
        ring = driver.execute_script("return document.querySelector('#ring').textContent")
        assert ring.count("Thunderbolt 5") == 1 and ring.count("Thunderbolt 4") == 2
        assert "Apple M2 Ultra" in ring
        shot(driver, "test_status_web", "agents")
        urls = requested_urls(driver, web.base)
        assert urls and all(u.startswith(web.base + "/") for u in urls), urls
        assert console_problems(driver) == []


def test_errors_are_one_line(web):
    """A port taken (the dashboard's own), no secret, an address beyond loopback with no key:
    one line, exit 1, no traceback."""
    for env, args, said in (
        (web.env, ["--port", str(PORT)], "cannot listen on 127.0.0.1:8090"),
        (web.env | {"MLXDIST_CONFIG": str(web.work / "none")}, [], "no secret at"),
        # the agents' facts on a network only behind a key
        (web.env, ["--host", "0.0.0.0"], "would serve the dashboard beyond this machine"),
    ):
        argv = cli("status", "--cluster", "web", "--interface", "eth0", "--web", *args)
        done = subprocess.run(
            web.machines[0].cmd(*argv), env=env, cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr and said in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_an_agent_that_stops_is_gone_within_10_s(web):
    """Last: stops the third agent."""
    stop_agents(web.agents[2:])
    started = time.monotonic()
    while web.nodes()["studio-3"]["state"] != "gone":
        assert time.monotonic() - started < 10, web.nodes()["studio-3"]
        time.sleep(0.5)
    print(f"studio-3 gone after {time.monotonic() - started:.1f} s")
    state = web.state()
    failed = [e for e in state["events"] if e["kind"] == "failed"]
    assert [e["node"] for e in failed] == ["studio-3"]
    assert "studio-3" in failed[0]["text"] and "stopped answering" in failed[0]["text"]
    others = {n["name"]: n["state"] for n in state["nodes"]}
    assert others == {"studio-1": "idle", "studio-2": "idle", "studio-3": "gone"}
