"""Two captured Macs as agents in network namespaces: a 6-port Mac Studio (tests/data/macos/
studio-1) and a 3-port MacBook Pro (macbook-3port), each agent's facts replayed from its capture
(MLXDIST_FACTS_FROM) on the namespace's own address. They advertise, a launcher in a third
namespace discovers them, reads their full facts over the signed API and plans across them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from netns import available, bridged_hosts
from test_cluster_hosts import Machine, cli, start_agents, stop_agents

from launcher.discovery import facts_digest
from launcher.hostfacts import FACTS_FROM_ENV, replayed_here

WHY_NOT = available()
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(WHY_NOT is not None, reason=f"needs network namespaces: {WHY_NOT}"),
]

MACOS = ROOT / "tests" / "data" / "macos"
MACS = ["studio-1", "macbook-3port"]
NAMES = ["studio-1", "macbook-1"]  # their host names, as the captures give them
R1_CONFIG = ROOT / "tests" / "data" / "deepseek-r1-config.json"

BROWSE = """
import json, sys
from launcher.discovery import browse
print(json.dumps({a.hostname: a.txt for a in browse(sys.argv[1], [sys.argv[2]], 3.0)}))
"""


@pytest.fixture(scope="module")
def macs(tmp_path_factory):
    """(launcher machine, its environment): agents of cluster "macs" on machines 1 and 2."""
    work = tmp_path_factory.mktemp("macs")
    env = dict(os.environ, MLXDIST_CONFIG=str(work / "launcher"))
    subprocess.run(cli("init"), env=env, cwd=ROOT, check=True, capture_output=True)
    with bridged_hosts(3) as hosts:
        machines = [Machine(h.name, h.ip, 52417) for h in hosts]
        agents = start_agents(
            machines[1:],
            "eth0",
            work,
            ["macs", "macs"],
            lambda i: {FACTS_FROM_ENV: str(MACOS / MACS[i])},
        )
        try:
            yield machines, env
        finally:
            stop_agents(agents)


def run(machine: Machine, env: dict, *argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        machine.cmd(*argv), env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    print(done.stdout[-3000:], done.stderr[-3000:])
    return done


def test_the_advertisements_are_small_and_name_the_facts(macs, tmp_path):
    machines, env = macs
    done = run(machines[0], env, sys.executable, "-c", BROWSE, "macs", machines[0].ip)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert sorted(seen) == ["macbook-1", "studio-1"]
    for name, folder in (("studio-1", "studio-1"), ("macbook-1", "macbook-3port")):
        txt = seen[name]
        assert set(txt) == {"cluster", "id", "port", "host", "os", "mlx", "mlxdist", "facts"}
        # The Mac's stable facts, as its capture gives them on an address-less machine.
        facts = replayed_here(MACOS / folder, tmp_path / f"{name}-id", {}).to_dict()
        assert txt["facts"] == facts_digest(facts)


def test_status_lists_both_macs_from_their_facts(macs):
    machines, env = macs
    done = run(machines[0], env, *cli("status", "--cluster", "macs", "--interface", "eth0"))
    assert done.returncode == 0, done.stderr
    assert "2 agents" in done.stdout
    rows = {line.split("│")[1].strip(): line for line in done.stdout.splitlines() if "│" in line}
    assert "Apple M3 Ultra" in rows["studio-1"] and "550" in rows["studio-1"]
    assert "Apple M4 Max" in rows["macbook-1"] and "137" in rows["macbook-1"]
    assert set(re.findall(r"169\.254\.\d+\.\d+", done.stdout)) == {m.ip for m in machines[1:]}


def test_plan_across_the_discovered_macs(macs, tmp_path):
    machines, env = macs
    args = cli(
        "plan",
        str(R1_CONFIG),
        "--cluster",
        "macs",
        "--interface",
        "eth0",
        "--parallel",
        "pipeline",
        "--json",
    )
    done = run(machines[0], env, *args)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    # The one cable (MacBook Thunderbolt 1 to the Studio's Thunderbolt 5) makes the ring; rank 0
    # is the lesser verified node id, whatever the host names.
    work = Path(env["MLXDIST_CONFIG"]).parent
    ids = {m: (work / f"node{i}" / "node_id").read_text().strip() for i, m in enumerate(NAMES)}
    assert plan["order"] == sorted(ids, key=ids.get)
    rows = {row["name"]: row for row in plan["nodes"]}
    assert sum(row["layers"] for row in plan["nodes"]) == 61  # DeepSeek R1's decoder layers
    assert rows["studio-1"]["layers"] > rows["macbook-1"]["layers"] > 0
    assert plan["fits"] is True
    # Each node is planned with the memory its own capture reports, fetched from its agent.
    for name, folder in (("studio-1", "studio-1"), ("macbook-1", "macbook-3port")):
        facts = replayed_here(MACOS / folder, tmp_path / f"{name}-id", {})
        assert rows[name]["memory_bytes"] == facts.memory_available
