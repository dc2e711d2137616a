"""Host-facts parsers and the ring topology on command output published from real Macs.

tests/data/macos/real/<mac>/ holds what could be found (SOURCE.txt names each file's origin):
  m3-ultra-studio-omlx, m5-max-macbookpro-omlx  system_profiler Thunderbolt JSON of a Mac Studio
      (6 receptacles) and a MacBook Pro (3) cabled to each other: both ends of one cable.
  m3-ultra-mlx-docs, m4-pro-macmini-tn3205      ibv_devices of an M3 Ultra and an M4 Pro Mac mini.
  tn3205-bridge0, tn3205-en2                    ifconfig of a Thunderbolt Bridge and of a
      Thunderbolt port, from Apple's TN3205.
No real capture of networksetup, sysctl, vm_stat or SPDisplays from these Macs was found, so the
ring is compared with MLX's own code on the real cabled pair (with a stated port map) and on the
synthesised studio-1..3 trio in tests/data/macos.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlx._distributed_utils import config as mlx_config
from mlx._distributed_utils.common import Host

from launcher.hostfacts import (
    MACOS_COMMANDS,
    OPTIONAL_COMMANDS,
    HostFactsError,
    ThunderboltPort,
    collect_macos,
    parse_bridge_members,
    parse_hardware_ports,
    parse_ibv_devices,
    parse_ifconfig,
    parse_thunderbolt,
    replay_runner,
    thunderbolt_ports,
)
from launcher.topology import Link, cable_graph, ring_addresses, ring_order, setup_commands

MACOS = Path(__file__).parent / "data" / "macos"
REAL = MACOS / "real"
TB_JSON = "system_profiler-SPThunderboltDataType.json"
PORTS_TXT = "networksetup-listallhardwareports.txt"
FOLDERS = sorted(p.name for p in REAL.iterdir() if p.is_dir())

STUDIO = "m3-ultra-studio-omlx"
MACBOOK = "m5-max-macbookpro-omlx"
STUDIO_CABLED = "28CA4C30-A263-4C55-B302-953416D0B209"  # the Studio's receptacle 2
MACBOOK_CABLED = "817DCFA4-B481-4100-80FC-91C7AA969F0B"  # the MacBook's receptacle 1


def read(folder: str, name: str) -> str:
    return (REAL / folder / name).read_text()


# ---- every file has a source ----


@pytest.mark.parametrize("folder", FOLDERS)
def test_each_real_file_names_its_source(folder):
    files = sorted(p.name for p in (REAL / folder).iterdir() if p.name != "SOURCE.txt")
    source = read(folder, "SOURCE.txt")
    assert files, f"{folder} holds no capture"
    assert set(files) <= set(MACOS_COMMANDS), f"{folder}: files not named after a command"
    for name in files:
        assert name in source and "https://" in source.split(name, 1)[1], (folder, name)


# ---- parsers, field by field, against values read from the text ----

STUDIO_BUSES = [
    # bus, receptacle, domain, peers, speed (the drive on receptacle 4 has no domain: no peer)
    ("thunderboltusb4_bus_5", "6", "1CF1083E-9B3C-4D21-8467-769814784F4D", [], "Up to 120 Gb/s"),
    ("thunderboltusb4_bus_4", "5", "54AA5FD1-F8F9-438A-8825-7268E164186C", [], "Up to 120 Gb/s"),
    ("thunderboltusb4_bus_3", "4", "5F771049-70BD-4C30-A4AB-4E50482D82E0", [], "80 Gb/s"),
    ("thunderboltusb4_bus_2", "3", "C9B32174-396A-4D89-9601-E8E83285C21A", [], "Up to 120 Gb/s"),
    ("thunderboltusb4_bus_1", "2", STUDIO_CABLED, [MACBOOK_CABLED], "80 Gb/s"),
    ("thunderboltusb4_bus_0", "1", "57AE1A4C-B830-48D1-90DD-A3EDB8AC8DFC", [], "Up to 120 Gb/s"),
]
MACBOOK_BUSES = [
    ("thunderboltusb4_bus_2", "3", "AD089FC0-E653-4FFE-B00A-DFF110B2F9A1", [], "Up to 120 Gb/s"),
    ("thunderboltusb4_bus_1", "2", "200E23D3-C921-44E0-95F7-55144AC251CC", [], "Up to 120 Gb/s"),
    ("thunderboltusb4_bus_0", "1", MACBOOK_CABLED, [STUDIO_CABLED], "80 Gb/s"),
]


@pytest.mark.parametrize("folder,expected", [(STUDIO, STUDIO_BUSES), (MACBOOK, MACBOOK_BUSES)])
def test_parse_thunderbolt_real(folder, expected):
    buses = parse_thunderbolt(read(folder, TB_JSON))
    got = [
        (b["bus"], b["receptacle"], b["domain_uuid"], b["peer_uuids"], b["speed"]) for b in buses
    ]
    assert got == expected


@pytest.mark.parametrize(
    "folder,devices",
    [
        # listed order kept: this M3 Ultra lists rdma_en5 before rdma_en4
        (
            "m3-ultra-mlx-docs",
            ["rdma_en2", "rdma_en3", "rdma_en5", "rdma_en4", "rdma_en6", "rdma_en7"],
        ),
        ("m4-pro-macmini-tn3205", ["rdma_en2", "rdma_en3", "rdma_en4"]),
    ],
)
def test_parse_ibv_devices_real(folder, devices):
    assert parse_ibv_devices(read(folder, "ibv_devices.txt")) == devices


@pytest.mark.parametrize(
    "folder,addresses,bridges",
    [
        # 169.254.205.255 netmask 0xffff0000: the /16 macOS self-assigns; no bridge
        ("tn3205-en2", {"en2": ["169.254.205.255/16"]}, {}),
        # Apple's "..." cuts leave bridge0 without an inet line; its three members stay
        ("tn3205-bridge0", {}, {"bridge0": ["en2", "en3", "en4"]}),
    ],
)
def test_parse_ifconfig_real(folder, addresses, bridges):
    text = read(folder, "ifconfig.txt")
    assert parse_ifconfig(text) == addresses
    assert parse_bridge_members(text) == bridges


# ---- collect_macos on each folder: runs where the files are, names what is missing ----

REQUIRED = [name for name in MACOS_COMMANDS if name not in OPTIONAL_COMMANDS]


@pytest.mark.parametrize("folder", FOLDERS)
def test_collect_macos_on_real_folder(folder, tmp_path):
    present = {p.name for p in (REAL / folder).iterdir()}
    missing = [name for name in REQUIRED if name not in present]
    run = replay_runner(REAL / folder)
    if not missing:
        facts = collect_macos(run, tmp_path / "node_id", working_set=lambda: 0)
        assert facts.memory_total > 0 and facts.chip
        return
    # A partial capture is reported as a HostFactsError (a UserError: one line, no traceback)
    # naming the first file collect_macos asks for and cannot find.
    with pytest.raises(HostFactsError, match=f"no {missing[0]} in "):
        collect_macos(run, tmp_path / "node_id", working_set=lambda: 0)


# ---- ring topology against MLX's own mlx.distributed_config code ----


def mlx_derive(files: dict[str, dict[str, str]], monkeypatch):
    """MLX's connectivity, rings and IP plan from each host's captured output, hosts in order."""

    def run(argv, capture_output=False, text=False, **_):
        host, command = argv[1], argv[2]
        name = TB_JSON if command == "system_profiler" else PORTS_TXT
        return SimpleNamespace(stdout=files[host][name].encode(), returncode=0)

    monkeypatch.setattr(mlx_config, "run", run)
    hosts = [Host(i, name, [], []) for i, name in enumerate(files)]
    tb_hosts, index = mlx_config.extract_connectivity(hosts, False)
    matrix = mlx_config.make_connectivity_matrix(tb_hosts, index)
    rings = mlx_config.extract_rings(matrix)
    ips = mlx_config.IPConfigurator(hosts, tb_hosts, index).ips
    return [h.ssh_hostname for h in hosts], rings, ips


def mlx_cables(names: list[str], ips) -> list[Link]:
    cables = set()
    for (i, j), ends in ips.items():
        for (iface, _), (peer_iface, _) in zip(ends, ips[j, i]):
            a, b = sorted([(names[i], iface), (names[j], peer_iface)])
            cables.add(Link(a[0], a[1], b[0], b[1]))
    return sorted(cables)


def same_cycle(a: list[str], b: list[str]) -> bool:
    """Equal as rings: the same cyclic order, read either way round."""
    n, doubled = len(b), b + b
    return sorted(a) == sorted(b) and any(doubled[k : k + n] in (a, a[::-1]) for k in range(n))


def our_hops(order: list[str], links: list[Link]) -> list[tuple[list[str], list[str]]]:
    """Per rank r: (r's interfaces, r-1's interfaces) on the cables between r-1 and r."""
    hops = []
    for r, host in enumerate(order):
        prev = order[r - 1]
        between = sorted(link for link in links if link.joins(prev, host))
        hops.append(([x.iface(host) for x in between], [x.iface(prev) for x in between]))
    return hops


def mlx_hops(
    names: list[str], ring: list[int], count: int, ips
) -> list[tuple[list[str], list[str]]]:
    """The same per rank from MLX's plan: configure_ring lists ips[node, prev][c] for rank i."""
    hops = []
    for i, node in enumerate(ring):
        prev = ring[i - 1]
        hops.append(
            (
                sorted(ips[node, prev][c][0] for c in range(count)),
                sorted(ips[prev, node][c][0] for c in range(count)),
            )
        )
    return hops


def rank_ifaces(order, links, commands) -> list[list[str]]:
    """Which port carries each rank's hostfile address, once our setup commands have run."""
    addresses: dict[str, dict[str, list[str]]] = {h: {} for h in order}
    for host, lines in commands.items():
        for line in lines:
            words = line.split()
            if words[:2] == ["sudo", "ifconfig"] and "inet" in words:
                net = ipaddress.ip_interface(f"{words[4]}/{words[6]}")
                addresses[host][words[2]] = [str(net)]
    ring = ring_addresses(order, links, addresses)
    assert not ring.missing and ring.ok
    owner = {
        a.split("/")[0]: iface for h in order for iface, al in addresses[h].items() for a in al
    }
    return [sorted(owner[ip] for ip in ips) for ips in ring.ips]


def compare_with_mlx(ports: dict[str, list[ThunderboltPort]], files, monkeypatch) -> None:
    names, rings, ips = mlx_derive(files, monkeypatch)
    links = cable_graph(ports)
    assert links == mlx_cables(names, ips)

    order = ring_order(names, links)
    (mlx_ring, count) = rings[0]
    assert len(mlx_ring) == len(names) and order is not None
    mlx_order = [names[i] for i in mlx_ring]
    assert same_cycle(order, mlx_order)

    # Read both rings from the same starting host in MLX's direction, then compare each hop.
    start = mlx_order.index(order[0])
    mlx_order = mlx_order[start:] + mlx_order[:start]
    mlx_ring = mlx_ring[start:] + mlx_ring[:start]
    if len(order) > 2 and mlx_order != order:
        mlx_order = [mlx_order[0], *reversed(mlx_order[1:])]
        mlx_ring = [mlx_ring[0], *reversed(mlx_ring[1:])]
    assert mlx_order == order
    hops = our_hops(order, links)
    assert [(sorted(a), sorted(b)) for a, b in hops] == mlx_hops(names, mlx_ring, count, ips)

    commands = setup_commands(order, links)
    assert rank_ifaces(order, links, commands) == [
        h[0] for h in mlx_hops(names, mlx_ring, count, ips)
    ]


def test_real_cabled_pair_matches_mlx(monkeypatch):
    """The Studio and the MacBook from their real Thunderbolt JSON. networksetup was not
    published for them, so both sides get the same stated port map: "Thunderbolt N" is en(N+1)
    on the Studio (en2..en7, as the M3 Ultra's rdma_en2..rdma_en7 in MLX's docs) and en(N) on
    the MacBook (en0 being its Wi-Fi)."""
    port_maps = {
        "macbook": "".join(
            f"Hardware Port: Thunderbolt {n}\nDevice: en{n}\n\n" for n in range(1, 4)
        ),
        "studio": "".join(
            f"Hardware Port: Thunderbolt {n}\nDevice: en{n + 1}\n\n" for n in range(1, 7)
        ),
    }
    folders = {"macbook": MACBOOK, "studio": STUDIO}
    files = {h: {TB_JSON: read(folders[h], TB_JSON), PORTS_TXT: port_maps[h]} for h in folders}
    ports = {
        h: thunderbolt_ports(parse_thunderbolt(f[TB_JSON]), parse_hardware_ports(f[PORTS_TXT]), {})
        for h, f in files.items()
    }
    assert cable_graph(ports) == [Link("macbook", "en1", "studio", "en3")]
    compare_with_mlx(ports, files, monkeypatch)


def test_synthesised_trio_matches_mlx(monkeypatch, tmp_path):
    """studio-1..3 (synthesised, cabled in a ring) through collect_macos, against MLX."""
    hosts = ["studio-1", "studio-2", "studio-3"]
    ports = {
        h: collect_macos(replay_runner(MACOS / h), tmp_path / h, working_set=lambda: 0).thunderbolt
        for h in hosts
    }
    files = {h: {n: (MACOS / h / n).read_text() for n in (TB_JSON, PORTS_TXT)} for h in hosts}
    compare_with_mlx(ports, files, monkeypatch)
