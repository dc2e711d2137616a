"""Stand-in Macs cabled in a ring: each pair of neighbours joined by its own point-to-point
link with a /30, reported as Thunderbolt ports with peer domain UUIDs. The launch orders the
ring along the cables and the ranks talk over the cables' addresses; a cable without an
address gets the macOS commands that give it one, and no launch."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from conftest import ROOT
from netns import available, bridged_hosts, cable
from test_cluster_hosts import (
    Machine,
    assert_no_rank_left,
    launch_args,
    prepare,
    reference_text,
    start_agents,
    stop_agents,
)

WHY_NOT = available()
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(WHY_NOT is not None, reason=f"cables need network namespaces: {WHY_NOT}"),
]


def fake_ports(work, hosts, cables) -> list[dict]:
    """MLXDIST_FAKE_THUNDERBOLT files: each cable end a port naming the other end as peer."""
    ports: dict[int, list] = {i: [] for i in range(len(hosts))}
    for a, b, ia, ib in cables:
        ports[a].append(
            {
                "interface": ia,
                "hardware_port": ia,
                "ip": None,
                "domain_uuid": f"uuid-{a}-{ia}",
                "peer_uuids": [f"uuid-{b}-{ib}"],
            }
        )
        ports[b].append(
            {
                "interface": ib,
                "hardware_port": ib,
                "ip": None,
                "domain_uuid": f"uuid-{b}-{ib}",
                "peer_uuids": [f"uuid-{a}-{ia}"],
            }
        )
    envs = []
    for i in range(len(hosts)):
        path = work / f"thunderbolt-{i}.json"
        path.write_text(json.dumps(ports[i]))
        envs.append({"MLXDIST_FAKE_THUNDERBOLT": str(path)})
    return envs


@pytest.mark.parametrize("addressed", [True, False], ids=["addressed", "unaddressed"])
def test_ring_over_cables(tiny_r1, tmp_path, addressed):
    with bridged_hosts(4) as hosts:
        # The launcher's machine (0) is on the bridge only; machines 1-3 are cabled in a ring,
        # the last cable with or without addresses.
        pairs = [(1, 2), (2, 3), (3, 1)]
        cables = []
        for k, (a, b) in enumerate(pairs):
            ia, ib = cable(hosts[a], hosts[b], k, addressed=addressed or k < 2)
            cables.append((a, b, ia, ib))
        envs = fake_ports(tmp_path, hosts, cables)
        launcher_env, out = prepare(tiny_r1, tmp_path)
        machines = [Machine(h.name, h.ip, 52417) for h in hosts]
        agents = start_agents(
            machines, "eth0", tmp_path, ["beta", "alpha", "alpha", "alpha"], lambda i: envs[i]
        )
        try:
            args = launch_args(out, "--cluster", "alpha", "--interface", "eth0")
            done = subprocess.run(
                machines[0].cmd(*args),
                env=launcher_env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
            print(done.stderr[-3000:])
            if addressed:
                assert done.returncode == 0, done.stderr
                used = re.search(r"ring over the cables (\[.*\])", done.stderr).group(1)
                assert set(re.findall(r"192\.168\.200\.\d+", used)) <= {
                    f"192.168.200.{4 * k + e}" for k in range(3) for e in (1, 2)
                }
                assert len(re.findall(r"192\.168\.200\.\d+", used)) == 3
                assert done.stdout.rstrip("\n") == reference_text(out)
            else:
                assert done.returncode != 0
                assert "Traceback" not in done.stderr
                assert "these cables have no addresses" in done.stderr
                assert "sudo ifconfig" in done.stderr
            assert_no_rank_left(machines)
        finally:
            stop_agents(agents)
