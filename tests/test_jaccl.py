"""JACCL (RDMA over Thunderbolt 5) on a full mesh (jaccl) and on a ring of cables (jaccl-ring):
the backend chosen from the nodes' facts and cables, the hostfile mlxdist writes checked by
MLX's own launcher code, and the environment each rank gets compared with what mlx.launch gives
a rank of the same hostfile."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlx._distributed_utils import config as mlx_config
from mlx._distributed_utils import launch as mlx_launch
from mlx._distributed_utils.common import Host, Hostfile
from pydantic import ValidationError

from launcher.agent.ranks import Runs
from launcher.agent.requests import StartRank
from launcher.backend import (
    RDMA_BACKENDS,
    BackendError,
    choose_backend,
    rdma_matrix,
    rdma_ring_matrix,
)
from launcher.hostfacts import ThunderboltPort
from launcher.hosts import parse_hosts
from launcher.remote import rank_links
from launcher.topology import DISABLE_BRIDGE, cable_graph, setup_commands

FILE_VARIABLES = ("MLX_HOSTFILE", "MLX_IBV_DEVICES")
# The command each rank runs in the comparison: its MLX_* variables and their files, as JSON.
PRINT_ENV = (
    "import json, os\n"
    "env = {k: v for k, v in os.environ.items() if k.startswith('MLX_')}\n"
    f"files = {{k: open(env[k]).read() for k in {FILE_VARIABLES!r} if k in env}}\n"
    "print(json.dumps({'env': env, 'files': files}))\n"
)


# ---- simulated clusters ----


def cluster(
    n: int,
    cables: list[tuple[int, int]] | None = None,
    chip: str = "Apple M3 Ultra",
    rdma: bool = True,
) -> tuple[list[str], dict[str, dict]]:
    """Macs studio-1..n, cabled as cables says (rank pairs; default every pair once): each
    cable takes the next free port en2, en3, ... at both ends."""
    names = [f"studio-{i + 1}" for i in range(n)]
    cables = cables if cables is not None else [(i, j) for i in range(n) for j in range(i + 1, n)]
    ports: dict[str, list[dict]] = {name: [] for name in names}
    for i, j in cables:
        a, b = names[i], names[j]
        ia, ib = f"en{2 + len(ports[a])}", f"en{2 + len(ports[b])}"
        ports[a].append({"interface": ia, "domain_uuid": f"{a}-{ia}", "peer_uuids": [f"{b}-{ib}"]})
        ports[b].append({"interface": ib, "domain_uuid": f"{b}-{ib}", "peer_uuids": [f"{a}-{ia}"]})
    facts = {
        name: {
            "chip": chip,
            "thunderbolt": ports[name],
            "rdma_devices": [f"rdma_{p['interface']}" for p in ports[name]] if rdma else [],
            "bridges": {},
        }
        for name in names
    }
    return names, facts


def links_of(facts: dict[str, dict]):
    return cable_graph(
        {h: [ThunderboltPort.from_dict(p) for p in f["thunderbolt"]] for h, f in facts.items()}
    )


def without_device(facts: dict, host: str, device: str) -> dict:
    changed = json.loads(json.dumps(facts))
    changed[host]["rdma_devices"].remove(device)
    return changed


def with_bridge(facts: dict, host: str, members: list[str], bridge: str = "bridge0") -> dict:
    changed = json.loads(json.dumps(facts))
    changed[host]["bridges"] = {bridge: members}
    return changed


def reordered(case, ranks: list[int]):
    names, facts = case
    return [names[r] for r in ranks], facts


def with_speed(facts: dict, host: str, iface: str, speed: str) -> dict:
    changed = json.loads(json.dumps(facts))
    for p in changed[host]["thunderbolt"]:
        if p["interface"] == iface:
            p["speed"] = speed
    return changed


MESH3 = cluster(3)
MESH4 = cluster(4)
RING4 = cluster(4, [(0, 1), (1, 2), (2, 3), (3, 0)])
CHAIN3 = cluster(3, [(0, 1), (1, 2)])

# (name, cluster, asked, backend chosen, words its one line must hold)
CHOICES = [
    ("mesh of M3 Ultras with RDMA", MESH3, "auto", "jaccl", "every pair of the 3 nodes"),
    ("two M4 Max", cluster(2, chip="Apple M4 Max"), "auto", "jaccl", "Thunderbolt 5"),
    ("ring asked", MESH3, "ring", "ring", "asked for"),
    ("jaccl asked and possible", MESH3, "jaccl", "jaccl", "every pair"),
    (
        "one device missing",
        (MESH3[0], without_device(MESH3[1], "studio-3", "rdma_en3")),
        "auto",
        "ring",
        "studio-3 has no RDMA device rdma_en3 (enable RDMA in recovery mode: rdma_ctl enable)",
    ),
    ("RDMA off everywhere", cluster(3, rdma=False), "auto", "ring", "has no RDMA device rdma_en2"),
    (
        "M2 Ultras",
        cluster(3, chip="Apple M2 Ultra"),
        "auto",
        "ring",
        "Thunderbolt 4",
    ),
    (
        "a TB5 Mac whose port runs at 40 Gb/s",
        (MESH3[0], with_speed(MESH3[1], "studio-2", "en3", "40 Gb/s")),
        "auto",
        "ring",
        "studio-2 en3 has Thunderbolt 4",
    ),
    (
        "no chip named, but both buses report Thunderbolt 5 speeds",
        (
            cluster(2, chip="")[0],
            with_speed(
                with_speed(cluster(2, chip="")[1], "studio-1", "en2", "80 Gb/s"),
                "studio-2",
                "en2",
                "Up to 120 Gb/s",
            ),
        ),
        "auto",
        "jaccl",
        "Thunderbolt 5",
    ),
    ("unknown chip", cluster(2, chip="Intel Xeon"), "auto", "ring", "no known Thunderbolt"),
    ("no cables", cluster(3, cables=[]), "auto", "ring", "no Thunderbolt cables"),
    ("one node", cluster(1), "jaccl", "ring", "one node"),
    # ---- jaccl-ring: each rank cabled to the next ----
    (
        "cables form a ring of 4",
        RING4,
        "auto",
        "jaccl-ring",
        "each of the 4 nodes is cabled to the next over Thunderbolt 5 with RDMA; not jaccl, as "
        "jaccl needs every pair of Macs cabled, and studio-1 and studio-3 are not (and 1 more "
        "pair)",
    ),
    (
        "ring of 6 Mac Studios",
        cluster(6, [(i, (i + 1) % 6) for i in range(6)]),
        "auto",
        "jaccl-ring",
        "each of the 6 nodes",
    ),
    ("jaccl-ring asked on a ring", RING4, "jaccl-ring", "jaccl-ring", "each of the 4 nodes"),
    ("jaccl-ring asked on a mesh", MESH4, "jaccl-ring", "jaccl-ring", "cabled to the next"),
    (
        "a mesh whose cable off the ring has no RDMA device: the ring still has",
        (MESH4[0], without_device(MESH4[1], "studio-1", "rdma_en3")),  # studio-1 to studio-3
        "auto",
        "jaccl-ring",
        "not jaccl, as studio-1 has no RDMA device rdma_en3",
    ),
    (
        "a ring cable without a device",
        (RING4[0], without_device(RING4[1], "studio-2", "rdma_en3")),
        "auto",
        "ring",
        "studio-2 has no RDMA device rdma_en3",
    ),
    (
        "a ring of M2 Ultras",
        cluster(4, [(0, 1), (1, 2), (2, 3), (3, 0)], "Apple M2 Ultra"),
        "auto",
        "ring",
        "RDMA needs Thunderbolt 5",
    ),
    (
        "a chain, no ring",
        CHAIN3,
        "auto",
        "ring",
        "the cables form neither a full mesh nor a ring in rank order (studio-1 and studio-3 are "
        "neighbours but not cabled)",
    ),
    (
        "a ring listed out of the cables' order",
        reordered(RING4, [0, 2, 1, 3]),
        "auto",
        "ring",
        "list the hosts in the order of the cables' ring",
    ),
    # ---- a Thunderbolt Bridge still over the cables blocks RDMA (a loop of 3+ storms) ----
    (
        "a bridged mesh",
        (MESH3[0], with_bridge(MESH3[1], "studio-1", ["en2", "en3"])),
        "auto",
        "ring",
        "studio-1 en2 is still in bridge0, and a bridge over the cables loops traffic",
    ),
    (
        "a bridged ring",
        (RING4[0], with_bridge(RING4[1], "studio-3", ["en3"])),
        "auto",
        "ring",
        "studio-3 en3 is still in bridge0",
    ),
    (
        "a bridge over no cabled port",
        (RING4[0], with_bridge(RING4[1], "studio-3", ["en0"])),
        "auto",
        "jaccl-ring",
        "each of the 4 nodes",
    ),
]


@pytest.mark.parametrize("case", CHOICES, ids=[c[0] for c in CHOICES])
def test_choose_backend(case):
    _, (names, facts), asked, backend, words = case
    chosen = choose_backend(names, facts, links_of(facts), asked)
    assert chosen.backend == backend
    assert chosen.why.startswith(f"{backend}: ") and words in chosen.why, chosen.why
    assert "\n" not in chosen.why
    assert (chosen.rdma is not None) == (backend in RDMA_BACKENDS)


BRIDGE_OFF = [
    DISABLE_BRIDGE,
    "sudo ifconfig bridge0 deletem en2",
    "sudo ifconfig bridge0 deletem en3",
]
# (name, cluster, asked, words the error holds, setup commands printed per host)
IMPOSSIBLE = [
    (
        "device missing",
        (MESH3[0], without_device(MESH3[1], "studio-2", "rdma_en2")),
        "jaccl",
        "studio-2 has no RDMA device rdma_en2",
        {"studio-2": ["rdma_ctl enable"]},
    ),
    (
        "ring of 4",
        RING4,
        "jaccl",
        "every pair of Macs cabled, and studio-1 and studio-3 are not (and 1 more pair) "
        "(jaccl-ring can run over this ring: --backend jaccl-ring)",
        {},
    ),
    ("Thunderbolt 4", cluster(2, chip="M1 Ultra"), "jaccl", "RDMA needs Thunderbolt 5", {}),
    (
        "jaccl-ring on a chain",
        CHAIN3,
        "jaccl-ring",
        "cannot use jaccl-ring: jaccl-ring needs each rank cabled to the next, and studio-1 and "
        "studio-3 are not",
        {},
    ),
    (
        "jaccl-ring, a ring cable without a device",
        (RING4[0], without_device(RING4[1], "studio-4", "rdma_en2")),
        "jaccl-ring",
        "studio-4 has no RDMA device rdma_en2",
        {"studio-4": ["rdma_ctl enable"]},
    ),
    (
        "jaccl over a bridged mesh",
        (MESH3[0], with_bridge(MESH3[1], "studio-2", ["en2", "en3"])),
        "jaccl",
        "studio-2 en2 is still in bridge0",
        {"studio-2": BRIDGE_OFF},
    ),
    (
        "jaccl-ring over a bridged ring, with a device missing too",
        (
            RING4[0],
            without_device(
                with_bridge(RING4[1], "studio-1", ["en2", "en3"]), "studio-1", "rdma_en2"
            ),
        ),
        "jaccl-ring",
        "studio-1 has no RDMA device rdma_en2",
        {"studio-1": ["rdma_ctl enable", *BRIDGE_OFF]},
    ),
]


@pytest.mark.parametrize("case", IMPOSSIBLE, ids=[c[0] for c in IMPOSSIBLE])
def test_rdma_asked_but_impossible_names_what_is_missing(case):
    _, (names, facts), asked, words, setup = case
    with pytest.raises(BackendError, match=f"^cannot use {asked}: ") as caught:
        choose_backend(names, facts, links_of(facts), asked)
    assert words in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
    commands = {h: [c.split("  #")[0] for c in cs] for h, cs in caught.value.setup.items()}
    assert commands == setup


BRIDGED = [
    ("mesh of 3, one host bridged", MESH3, {"studio-1": {"bridge0": ["en2", "en3"]}}),
    (
        "ring of 4, two hosts bridged",
        RING4,
        {
            "studio-2": {"bridge0": ["en2", "en3"]},
            "studio-4": {"bridge0": ["en1", "en3"], "bridge1": ["en2"]},
        },
    ),
]


@pytest.mark.parametrize("case", BRIDGED, ids=[c[0] for c in BRIDGED])
def test_a_bridge_over_the_cables_prints_the_ring_setups_bridge_commands(case):
    """Auto falls back to the ring and prints, per bridged host, the bridge lines the ring
    setup prints for it (service off, each cabled port out of its bridge)."""
    _, (names, facts), bridges = case
    facts = json.loads(json.dumps(facts))
    for host, members in bridges.items():
        facts[host]["bridges"] = members
    links = links_of(facts)
    chosen = choose_backend(names, facts, links, "auto")
    assert chosen.backend == "ring" and "is still in bridge" in chosen.why
    ring_setup = setup_commands(names, links, bridges={n: facts[n]["bridges"] for n in names})
    assert set(chosen.setup) == set(bridges)
    for host, commands in chosen.setup.items():
        assert commands[0] == DISABLE_BRIDGE and len(commands) > 1
        assert ring_setup[host][: len(commands)] == commands
        assert "inet" in ring_setup[host][len(commands)]  # then the ring's own addresses


# ---- the RDMA matrix, as mlx.distributed_config writes it ----


def mlx_config_rdma(names, facts, tmp_path, monkeypatch) -> list[list]:
    """The rdma lists MLX's own configure_jaccl writes for this cabling (its ssh steps left out:
    the cabling is given as its parsed Thunderbolt hosts)."""
    tb_hosts = []
    for name in names:
        ports = [
            mlx_config.ThunderboltPort(p["interface"], p["domain_uuid"], p["peer_uuids"][0])
            for p in facts[name]["thunderbolt"]
        ]
        tb_hosts.append(mlx_config.ThunderboltHost(name, sorted(ports, key=lambda x: x.iface)))
    index = {p.uuid: (i, j) for i, h in enumerate(tb_hosts) for j, p in enumerate(h.ports)}
    hosts = [Host(i, name, [f"10.0.0.{i + 1}"], []) for i, name in enumerate(names)]
    monkeypatch.setattr(mlx_config, "add_ips", lambda hosts, verbose=False: None)
    monkeypatch.setattr(mlx_config.IPConfigurator, "setup", lambda self, **kw: None)
    out = tmp_path / "mlx-config.json"
    args = argparse.Namespace(verbose=False, env=[], auto_setup=False, output_hostfile=str(out))
    ips = mlx_config.IPConfigurator(hosts, tb_hosts, index)
    mlx_config.configure_jaccl(args, hosts, ips, [mlx_config.SSHInfo(True, False)] * len(hosts))
    return [h.rdma for h in Hostfile.from_file(out).hosts]


MATRICES = [
    ("mesh of 3", MESH3),
    ("mesh of 4", cluster(4)),
    ("two cables between 2", cluster(2, [(0, 1), (0, 1)])),
    # studio-1 cables studio-2 on en2 and en11 (en3..en10 go to the others): MLX sorts the
    # ports by name, "en11" before "en2", and takes as many cables per pair as the fewest any
    # pair has (one), so the pair's cable is en11 and, on studio-2's side, that cable's port.
    (
        "a pair with two cables among single ones",
        cluster(4, [(0, 1)] + [(0, 2), (0, 3)] * 4 + [(0, 1), (1, 2), (1, 3), (2, 3)]),
    ),
]


@pytest.mark.parametrize("case", MATRICES, ids=[c[0] for c in MATRICES])
def test_rdma_matrix_equals_mlx_distributed_config(case, tmp_path, monkeypatch):
    _, (names, facts) = case
    ours = rdma_matrix(names, links_of(facts))
    assert ours == mlx_config_rdma(names, facts, tmp_path, monkeypatch)


def mlx_config_ring(names, facts, tmp_path, monkeypatch) -> tuple[list[str], list[list]]:
    """The ring order and rdma lists MLX's own configure_jaccl_ring writes for this cabling, on
    the first full ring its extract_rings finds (its ssh steps left out, as above)."""
    tb_hosts = []
    for name in names:
        ports = [
            mlx_config.ThunderboltPort(p["interface"], p["domain_uuid"], p["peer_uuids"][0])
            for p in facts[name]["thunderbolt"]
        ]
        tb_hosts.append(mlx_config.ThunderboltHost(name, sorted(ports, key=lambda x: x.iface)))
    index = {p.uuid: (i, j) for i, h in enumerate(tb_hosts) for j, p in enumerate(h.ports)}
    rings = mlx_config.extract_rings(mlx_config.make_connectivity_matrix(tb_hosts, index))
    hosts = [Host(i, name, [f"10.0.0.{i + 1}"], []) for i, name in enumerate(names)]
    assert mlx_config.check_valid_ring(hosts, rings, strict=False)
    monkeypatch.setattr(mlx_config, "add_ips", lambda hosts, verbose=False: None)
    monkeypatch.setattr(mlx_config.IPConfigurator, "setup", lambda self, **kw: None)
    out = tmp_path / "mlx-config-ring.json"
    args = argparse.Namespace(verbose=False, env=[], auto_setup=False, output_hostfile=str(out))
    ips = mlx_config.IPConfigurator(hosts, tb_hosts, index)
    sshinfo = [mlx_config.SSHInfo(True, False)] * len(hosts)
    mlx_config.configure_jaccl_ring(args, hosts, ips, rings[0], sshinfo)
    written = Hostfile.from_file(out)
    assert written.backend == "jaccl-ring"
    return [h.ssh_hostname for h in written.hosts], [h.rdma for h in written.hosts]


RING_MATRICES = [
    ("ring of 3", cluster(3, [(0, 1), (1, 2), (2, 0)])),
    ("ring of 4", RING4),
    ("ring of 6", cluster(6, [(i, (i + 1) % 6) for i in range(6)])),
    ("ring of 4, two cables per neighbour", cluster(4, [(0, 1), (1, 2), (2, 3), (3, 0)] * 2)),
    # one pair has two cables, the others one: one cable per pair, the first by port name
    (
        "ring of 5, one pair cabled twice",
        cluster(5, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0), (2, 3)]),
    ),
    ("mesh of 4, as a ring", MESH4),
    ("two Macs, two cables", cluster(2, [(0, 1), (0, 1)])),
]


@pytest.mark.parametrize("case", RING_MATRICES, ids=[c[0] for c in RING_MATRICES])
def test_rdma_ring_matrix_equals_mlx_configure_jaccl_ring(case, tmp_path, monkeypatch):
    _, (names, facts) = case
    order, theirs = mlx_config_ring(names, facts, tmp_path, monkeypatch)
    links = links_of(facts)
    assert rdma_ring_matrix(order, links) == theirs
    if len(names) > 2:  # two Macs are a mesh too: auto takes plain jaccl there
        chosen = choose_backend(order, facts, links, "jaccl-ring")
        assert (chosen.backend, chosen.rdma) == ("jaccl-ring", theirs)


# ---- the hostfile and each rank's environment, against mlx.launch ----


def mlx_launch_ranks(hostfile: Path, tmp_path: Path, monkeypatch) -> list[dict]:
    """What mlx.launch gives each rank of hostfile: its launcher run as `mlx.launch --hostfile
    FILE -- python -c PRINT_ENV` up to where it would start the ranks, then each rank's own
    launch script (MLX's make_launch_script, as for a local host) run with bash."""
    captured = []
    monkeypatch.setattr(
        mlx_launch, "_launch_with_io", lambda cls, arguments, verbose: captured.extend(arguments)
    )
    command = [sys.executable, "-c", PRINT_ENV]
    monkeypatch.setattr(sys, "argv", ["mlx.launch", "--hostfile", str(hostfile), "--", *command])
    mlx_launch.main()
    assert captured, "mlx.launch started no rank"
    ranks = []
    for (rank, _host, python, cwd, files, env, cmd), _ in captured:
        script = mlx_launch.RemoteProcess.make_launch_script(
            rank, python, cwd, files, env, cmd, True
        )
        scratch = tmp_path / f"mlx-{rank}"
        scratch.mkdir()
        out = subprocess.run(
            ["/bin/bash", "-c", script],
            env={"PATH": os.environ["PATH"], "TMPDIR": str(scratch)},
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        ranks.append(json.loads(out.stdout.strip().splitlines()[-1]))  # after the pidfile line
    return ranks


def agent_ranks(links: dict, world: int, tmp_path: Path) -> list[dict]:
    """What the agent gives each rank started with these start_rank values: each rank is a real
    process started by the agent's Runs (a stand-in interpreter that sleeps, since a jaccl rank
    cannot start on Linux), its environment read from the running process, then stopped."""
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nexec sleep 60\n")
    python.chmod(0o755)
    runs = Runs(tmp_path / "runs", str(python))
    (tmp_path / "runs").mkdir()
    ranks = []
    for rank in range(world):
        body = {"model": "m", "split": [1] * world, "rank": rank, "name": "t"}
        req = StartRank(**body, http_host="10.0.0.1", http_port=18080, **links)
        run = runs.start(tmp_path, req)
        try:
            proc = psutil.Process(run.proc.pid)
            deadline = time.monotonic() + 10
            while proc.cmdline()[:1] != ["sleep"]:  # until the exec: before it, the agent's own
                assert time.monotonic() < deadline, proc.cmdline()
                time.sleep(0.01)
            env = {k: v for k, v in proc.environ().items() if k.startswith("MLX_")}
        finally:
            runs.stop([run])
        files = {k: Path(env[k]).read_text() for k in FILE_VARIABLES if k in env}
        ranks.append({"env": env, "files": files})
    return ranks


def comparable(rank: dict) -> dict:
    """A rank's MLX_* variables, each naming a file given by that file's content instead (echo
    in mlx.launch's script ends it with a newline)."""
    files = {k: v.rstrip("\n") for k, v in rank["files"].items()}
    return {k: files.get(k, v) for k, v in rank["env"].items()}


def written_hostfile(cluster, tmp_path, asked: str = "auto"):
    """The backend chosen for cluster (as asked), its hosts (ssh destination, address), what each
    rank is given, the hostfile written for it and that hostfile as MLX's parser reads it."""
    names, facts = cluster
    chosen = choose_backend(names, facts, links_of(facts), asked)
    hosts = [(f"me@{n}.local", f"192.168.1.{i + 1}") for i, n in enumerate(names)]
    text, links = rank_links(hosts, chosen.backend, rdma=chosen.rdma)
    path = tmp_path / "hostfile.json"
    path.write_text(text)
    return chosen, hosts, links, path, Hostfile.from_file(path)


def test_jaccl_hostfile_passes_mlx_parser_and_launch_checks(tmp_path, monkeypatch):
    _, hosts, _, path, parsed = written_hostfile(MESH3, tmp_path)
    assert parsed.backend == "jaccl" and parsed.envs == ["MLX_METAL_FAST_SYNCH=1"]
    assert [h.ssh_hostname for h in parsed.hosts] == [d for d, _ in hosts]
    assert parsed.hosts[0].ips == ["192.168.1.1"]  # the coordinator's
    assert [h.rdma[i] for i, h in enumerate(parsed.hosts)] == [None] * 3
    assert parsed.hosts[2].rdma[0] == "rdma_en2"  # studio-3's first cable goes to studio-1
    ranks = mlx_launch_ranks(path, tmp_path, monkeypatch)  # passes launch_jaccl's checks
    assert [r["env"]["MLX_RANK"] for r in ranks] == ["0", "1", "2"]
    assert {r["env"]["MLX_JACCL_COORDINATOR"] for r in ranks} == {"192.168.1.1:32323"}


def test_jaccl_ring_hostfile_passes_mlx_parser_and_launch_checks(tmp_path, monkeypatch):
    chosen, hosts, links, path, parsed = written_hostfile(RING4, tmp_path)
    assert parsed.backend == "jaccl-ring" and parsed.envs == ["MLX_METAL_FAST_SYNCH=1"]
    assert [h.ssh_hostname for h in parsed.hosts] == [d for d, _ in hosts]
    assert [h.rdma for h in parsed.hosts] == chosen.rdma
    assert [parsed.hosts[0].rdma[2], parsed.hosts[1].rdma[3]] == [None, None]  # across the ring
    assert links["backend"] == "jaccl-ring" and links["coordinator"] == "192.168.1.1:32323"
    ranks = mlx_launch_ranks(path, tmp_path, monkeypatch)  # passes launch_jaccl's checks
    assert [r["env"]["MLX_RANK"] for r in ranks] == ["0", "1", "2", "3"]
    assert {r["env"]["MLX_JACCL_RING"] for r in ranks} == {"1"}


def test_mlx_launch_refuses_a_jaccl_ring_hostfile_missing_a_neighbour(tmp_path, monkeypatch):
    """A null is fine across the ring, not between neighbours: MLX's launcher says so too."""
    names, facts = RING4
    rdma = choose_backend(names, facts, links_of(facts), "jaccl-ring").rdma
    rdma[1][2] = None
    hosts = [(n, f"10.0.0.{i + 1}") for i, n in enumerate(names)]
    text, _ = rank_links(hosts, "jaccl-ring", rdma=rdma)
    path = tmp_path / "hostfile.json"
    path.write_text(text)
    monkeypatch.setattr(sys, "argv", ["mlx.launch", "--hostfile", str(path), "--", "true"])
    with pytest.raises(SystemExit):
        mlx_launch.main()


def test_mlx_launch_refuses_the_hostfile_a_ring_of_cables_would_need(tmp_path, monkeypatch):
    """Why plain jaccl is refused over a ring of 4: MLX's launcher itself rejects a matrix with
    a pair that has no device."""
    names, _ = RING4
    rdma = [[None if i == j else "rdma_en2" for j in range(4)] for i in range(4)]
    rdma[0][2] = None
    text, _ = rank_links([(n, f"10.0.0.{i + 1}") for i, n in enumerate(names)], "jaccl", rdma=rdma)
    path = tmp_path / "hostfile.json"
    path.write_text(text)
    monkeypatch.setattr(sys, "argv", ["mlx.launch", "--hostfile", str(path), "--", "true"])
    with pytest.raises(SystemExit):
        mlx_launch.main()


@pytest.mark.cluster  # the agent starts (stand-in) rank processes
@pytest.mark.parametrize("backend", ["jaccl", "jaccl-ring", "ring"])
def test_rank_environment_equals_mlx_launch(backend, tmp_path, monkeypatch):
    cluster = RING4 if backend == "jaccl-ring" else MESH3
    chosen, hosts, links, path, _ = written_hostfile(cluster, tmp_path, backend)
    assert chosen.backend == backend
    theirs = mlx_launch_ranks(path, tmp_path, monkeypatch)
    ours = agent_ranks(links, len(hosts), tmp_path)
    assert [comparable(r) for r in ours] == [comparable(r) for r in theirs]
    wanted = {"ring": "MLX_HOSTFILE", "jaccl": "MLX_IBV_DEVICES", "jaccl-ring": "MLX_IBV_DEVICES"}
    assert all(wanted[backend] in r["files"] for r in ours)  # it held the backend's file
    assert all(("MLX_JACCL_RING" in r["env"]) == (backend == "jaccl-ring") for r in ours)


# ---- requests and hosts.toml ----

GOOD_RDMA = [[None, "rdma_en2"], ["rdma_en2", None]]
JACCL = {"backend": "jaccl", "rdma": GOOD_RDMA, "coordinator": "10.0.0.1:32323"}
BAD_JACCL = [
    ("no matrix", {"rdma": None}),
    ("no coordinator", {"coordinator": None}),
    ("a ring hostfile too", {"hostfile": [["10.0.0.1:5000"], ["10.0.0.2:5001"]]}),
    ("not N x N", {"rdma": [[None, "rdma_en2"]]}),
    ("a short row", {"rdma": [[None], ["rdma_en2", None]]}),
    ("device to itself", {"rdma": [["rdma_en2", "rdma_en2"], ["rdma_en2", None]]}),
    ("no device to a peer", {"rdma": [[None, None], ["rdma_en2", None]]}),
    ("a flag", {"rdma": [[None, "--evil"], ["rdma_en2", None]]}),
    ("a path", {"rdma": [[None, "rdma_../../x"], ["rdma_en2", None]]}),
    ("a capital", {"rdma": [[None, "rdma_EN2"], ["rdma_en2", None]]}),
    ("not a device", {"rdma": [[None, "en2"], ["rdma_en2", None]]}),
    ("an empty cable list", {"rdma": [[None, []], ["rdma_en2", None]]}),
    ("a number", {"rdma": [[None, 2], ["rdma_en2", None]]}),
    ("coordinator a name", {"coordinator": "studio-1:32323"}),
    ("coordinator no port", {"coordinator": "10.0.0.1"}),
    ("coordinator port 0", {"coordinator": "10.0.0.1:0"}),
    ("coordinator port too big", {"coordinator": "10.0.0.1:99999"}),
    ("coordinator a flag", {"coordinator": "--x:1"}),
    ("rdma on the ring", {"backend": "ring", "hostfile": [["10.0.0.1:1"], ["10.0.0.2:2"]]}),
    ("a backend MLX has but we do not start", {"backend": "mpi"}),
    ("jaccl-ring without a matrix", {"backend": "jaccl-ring", "rdma": None}),
]
# jaccl-ring over 4 ranks: each rank's devices to its two neighbours, null across the ring
RING_RDMA = [
    [None, "rdma_en2", None, "rdma_en3"],
    ["rdma_en2", None, "rdma_en3", None],
    [None, "rdma_en2", None, "rdma_en3"],
    ["rdma_en3", None, "rdma_en2", None],
]
JACCL_RING = {"backend": "jaccl-ring", "rdma": RING_RDMA, "split": [1, 1, 1, 1]}


def with_cell(matrix: list[list], i: int, j: int, cell) -> list[list]:
    changed = json.loads(json.dumps(matrix))
    changed[i][j] = cell
    return changed


BAD_JACCL_RING = [
    ("a neighbour without a device", {"rdma": with_cell(RING_RDMA, 1, 2, None)}),
    ("the last rank's next, the first, without one", {"rdma": with_cell(RING_RDMA, 3, 0, None)}),
    ("a device to itself", {"rdma": with_cell(RING_RDMA, 2, 2, "rdma_en2")}),
    ("a bad name across the ring", {"rdma": with_cell(RING_RDMA, 0, 2, "--evil")}),
    ("nulls across the ring on plain jaccl", {"backend": "jaccl"}),
    ("a ring hostfile too", {"hostfile": [["10.0.0.1:1"], ["10.0.0.2:2"]] * 2}),
]


def start_body(**changes) -> dict:
    body = {"model": "m", "split": [1, 1], "rank": 1, "http_host": "10.0.0.1", "name": "t"}
    return body | {"http_port": 18080} | JACCL | changes


def test_start_rank_takes_a_jaccl_rank():
    req = StartRank(**start_body())
    assert (req.backend, req.rdma, req.coordinator) == ("jaccl", GOOD_RDMA, "10.0.0.1:32323")
    lists = [[None, ["rdma_en2", "rdma_en3"]], [["rdma_en2", "rdma_en3"], None]]
    assert StartRank(**start_body(rdma=lists)).rdma == lists  # two cables per pair


@pytest.mark.parametrize("change", BAD_JACCL, ids=[c[0] for c in BAD_JACCL])
def test_start_rank_refuses_bad_jaccl_requests(change):
    with pytest.raises(ValidationError):
        StartRank(**start_body(**change[1]))


def test_start_rank_takes_a_jaccl_ring_rank():
    req = StartRank(**start_body(**JACCL_RING))
    assert (req.backend, req.rdma) == ("jaccl-ring", RING_RDMA)
    mesh = [[None if i == j else "rdma_en2" for j in range(4)] for i in range(4)]
    assert StartRank(**start_body(**JACCL_RING | {"rdma": mesh})).rdma == mesh  # devices across
    two = [[None, "rdma_en2"], ["rdma_en2", None]]  # two ranks: each the other's both neighbours
    assert StartRank(**start_body(backend="jaccl-ring", rdma=two)).rdma == two


@pytest.mark.parametrize("change", BAD_JACCL_RING, ids=[c[0] for c in BAD_JACCL_RING])
def test_start_rank_refuses_bad_jaccl_ring_requests(change):
    with pytest.raises(ValidationError):
        StartRank(**start_body(**JACCL_RING | change[1]))


@pytest.mark.parametrize(
    "backend,mlx", [("ring", "ring"), ("jaccl", "jaccl"), ("jaccl-ring", "jaccl")]
)
def test_a_rank_initialises_mlx_with_the_name_its_cpp_backend_has(backend, mlx, tmp_path):
    """mx.distributed.init knows jaccl, not jaccl-ring: a jaccl-ring rank starts as jaccl (with
    MLX_JACCL_RING=1 in its environment), from the agent and over ssh alike."""
    from launcher.agent.ranks import rank_argv
    from launcher.rankspec import RankSpec
    from launcher.ssh import rank_spec as ssh_rank_spec

    body = start_body(**(JACCL_RING if backend == "jaccl-ring" else {"backend": backend}))
    if backend == "ring":
        body = body | {
            "rdma": None,
            "coordinator": None,
            "hostfile": [["10.0.0.1:1"], ["10.0.0.2:2"]],
        }
    req = StartRank(**body)
    argv = rank_argv("python", tmp_path, req)
    assert RankSpec.from_argv(argv[3:]).backend == mlx
    assert ssh_rank_spec(body).backend == mlx


@pytest.mark.parametrize("backend", ["ring", "jaccl", "jaccl-ring", "auto"])
def test_hosts_file_backend(backend):
    hosts = parse_hosts(f'backend = "{backend}"\n[[hosts]]\nname = "a"\naddress = "10.0.0.1"\n')
    assert hosts.backend == backend


def test_hosts_file_backend_defaults_to_auto():
    assert parse_hosts('[[hosts]]\nname = "a"\naddress = "10.0.0.1"\n').backend == "auto"


# ---- through a real agent: the hostfile names hosts.toml's ssh destination ----

# argv: root, port, the interpreter the agent starts ranks with
AGENT = """
import sys
from pathlib import Path
from launcher.agent import create_agent_app, serve_agent
from launcher.secret import load_secret

root = Path(sys.argv[1])
app = create_agent_app(
    load_secret(root / "secret"), root / "models", lambda: {"hostname": "stand-in"},
    python=sys.argv[3], runs_dir=root / "runs",
)
serve_agent(app, ["127.0.0.1", "127.0.0.2"], int(sys.argv[2]), log_level="warning")
"""


@pytest.mark.cluster  # an agent process, and the (stand-in) ranks it starts
def test_start_remote_over_jaccl_through_an_agent(tmp_path):
    """Two hosts of a hosts.toml (one with an ssh destination) served by one real agent on two
    loopback addresses; the ranks it starts sleep in place of a rank, since jaccl needs a Mac."""
    from launcher.agent_client import AgentError
    from launcher.cluster import nodes_from_hosts
    from launcher.hostfile import free_ports
    from launcher.local import LaunchError
    from launcher.remote import start_remote
    from launcher.secret import create_secret, load_secret
    from mlxdist.testing.tiny_r1 import make_r1
    from quantize.checkpoint import read_config

    root = tmp_path / "agent"
    make_r1(root / "models" / "tiny", preset="tiny")
    secret = load_secret(create_secret(root / "secret"))
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nexec sleep 60\n")
    python.chmod(0o755)
    port = free_ports(1)[0]
    cmd = [sys.executable, "-c", AGENT, str(root), str(port), str(python)]
    log = open(tmp_path / "agent.log", "wb")
    agent = subprocess.Popen(cmd, cwd=Path(__file__).parent.parent, stdout=log, stderr=log)
    try:
        hosts_toml = tmp_path / "hosts.toml"
        hosts_toml.write_text(
            'backend = "jaccl"\n'
            f'[[hosts]]\nname = "studio-1"\naddress = "127.0.0.1"\nagent_port = {port}\n'
            'ssh = "me@studio-1.local"\n'
            f'[[hosts]]\nname = "studio-2"\naddress = "127.0.0.2"\nagent_port = {port}\n'
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                nodes = nodes_from_hosts(hosts_toml, secret)
                break
            except LaunchError:  # the agent is still starting
                assert agent.poll() is None, (tmp_path / "agent.log").read_text()
                assert time.monotonic() < deadline, "the agent did not start"
                time.sleep(0.2)
        layers = read_config(root / "models" / "tiny")["num_hidden_layers"]
        rdma = [[None, "rdma_en2"], ["rdma_en3", None]]
        running = start_remote(
            nodes,
            ["tiny", "tiny"],
            [layers] * 2,
            name="t",
            parallel="tensor",
            backend="jaccl",
            rdma=rdma,
        )
        try:
            hostfile = json.loads(running.hostfile)
            assert [h["ssh"] for h in hostfile["hosts"]] == ["me@studio-1.local", "127.0.0.2"]
            assert [h["rdma"] for h in hostfile["hosts"]] == rdma
            assert hostfile["backend"] == "jaccl"
            runs = sorted(nodes[0].client.ranks(), key=lambda r: r["rank"])
            assert [r["rank"] for r in runs] == [0, 1]
            for rank, run in enumerate(runs):
                proc = psutil.Process(run["pid"])
                while proc.cmdline()[:1] != ["sleep"]:  # until the exec
                    assert time.monotonic() < deadline + 30, proc.cmdline()
                    time.sleep(0.01)
                env = proc.environ()
                assert env["MLX_RANK"] == str(rank)
                assert env["MLX_JACCL_COORDINATOR"] == "127.0.0.1:32323"
                assert json.loads(Path(env["MLX_IBV_DEVICES"]).read_text()) == rdma
                assert "MLX_HOSTFILE" not in env
        finally:
            running.stop()
    except AgentError as e:
        raise AssertionError((tmp_path / "agent.log").read_text()) from e
    finally:
        agent.terminate()
        agent.wait(15)
        log.close()


@pytest.mark.parametrize(
    "args,words",
    [
        (["launch", "--local", "2", "--backend", "jaccl"], "--backend jaccl is for Macs cabled"),
        (["serve", "--backend", "jaccl"], "--backend jaccl is for Macs cabled"),
        (
            ["launch", "--local", "2", "--backend", "jaccl-ring"],
            "--backend jaccl-ring is for Macs cabled",
        ),
        (
            ["bench", "--backend", "tcp"],
            "--backend must be ring, jaccl, jaccl-ring or auto, not 'tcp'",
        ),
    ],
)
def test_backend_option_refuses_what_cannot_run(args, words):
    from typer.testing import CliRunner

    from mlxdist.cli import app

    done = CliRunner().invoke(app, args)
    assert done.exit_code == 1, done.output
    assert words in done.output and "Traceback" not in done.output
