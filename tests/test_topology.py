"""Cable graph, ring order, ring addresses and setup commands.

The captured cluster (tests/data/macos) is cabled in a ring:
  studio-1 en2 (Thunderbolt 1) <-> studio-2 en3 (Thunderbolt 2)   192.168.200.0/30
  studio-2 en2 (Thunderbolt 1) <-> studio-3 en4 (Thunderbolt 3)   192.168.200.4/30
  studio-3 en2 (Thunderbolt 1) <-> studio-1 en3 (Thunderbolt 2)   192.168.200.8/30
studio-3/ifconfig-after-reboot.txt is studio-3 after a reboot: its ports are back in the
Thunderbolt Bridge and have lost their /30s, while its neighbours kept theirs.
"""

from pathlib import Path

import pytest

from launcher.hostfacts import (
    ThunderboltPort,
    parse_bridge_members,
    parse_hardware_ports,
    parse_ifconfig,
    parse_thunderbolt,
    thunderbolt_ports,
)
from launcher.hostfile import ring_hostfile
from launcher.topology import (
    DISABLE_BRIDGE,
    Link,
    cable_graph,
    explain_no_ring,
    ring_addresses,
    ring_order,
    setup_commands,
)

MACOS = Path(__file__).parent / "data" / "macos"
TB_JSON = "system_profiler-SPThunderboltDataType.json"
PORTS_TXT = "networksetup-listallhardwareports.txt"
HOSTS = ["studio-1", "studio-2", "studio-3"]
RING_LINKS = [
    Link("studio-1", "en2", "studio-2", "en3"),
    Link("studio-1", "en3", "studio-3", "en2"),
    Link("studio-2", "en2", "studio-3", "en4"),
]


def captured(ifconfig: dict[str, str] | None = None):
    """(ports, addresses, bridges) per host from the captured output."""
    ports, addresses, bridges = {}, {}, {}
    for host in HOSTS:
        text = (MACOS / host / (ifconfig or {}).get(host, "ifconfig.txt")).read_text()
        addresses[host] = parse_ifconfig(text)
        bridges[host] = parse_bridge_members(text)
        ports[host] = thunderbolt_ports(
            parse_thunderbolt(
                (MACOS / host / "system_profiler-SPThunderboltDataType.json").read_text()
            ),
            parse_hardware_ports(
                (MACOS / host / "networksetup-listallhardwareports.txt").read_text()
            ),
            addresses[host],
        )
    return ports, addresses, bridges


EIGHT = ["a-e", "e-c", "c-g", "g-b", "b-f", "f-d", "d-h", "h-a"]


def links_of(*pairs: str) -> list[Link]:
    """Links from "a-b" strings, one port per cable (a:b / b:a) so repeats stay distinct."""
    out = []
    for i, pair in enumerate(pairs):
        x, y = sorted(pair.split("-"))
        out.append(Link(x, f"{y}{i}", y, f"{x}{i}"))
    return out


def test_cable_graph_from_captured_output():
    ports, _, _ = captured()
    # studio-1's SSD on receptacle 4 has no domain uuid and makes no link.
    assert cable_graph(ports) == RING_LINKS


def test_cable_graph_one_sided_reports_and_loops():
    ports = {
        "a": [ThunderboltPort("en2", "Thunderbolt 1", None, "A1", ["B1"])],
        "b": [
            ThunderboltPort("en2", "Thunderbolt 1", None, "B1", []),  # did not list a
            ThunderboltPort("en3", "Thunderbolt 2", None, "B2", ["B3"]),  # looped back
            ThunderboltPort("en4", "Thunderbolt 3", None, "B3", ["B2"]),
            ThunderboltPort("en5", "Thunderbolt 4", None, "B4", ["Z9"]),  # host not in cluster
        ],
    }
    assert cable_graph(ports) == [Link("a", "en2", "b", "en2")]


def test_captured_ring_order_and_addresses():
    ports, addresses, _ = captured()
    links = cable_graph(ports)
    order = ring_order(ports, links)
    assert order == ["studio-1", "studio-2", "studio-3"]
    ring = ring_addresses(order, links, addresses)
    # Rank r listens on its own end of the cable from rank r-1.
    assert ring.ips == [["192.168.200.10"], ["192.168.200.2"], ["192.168.200.6"]]
    assert ring.missing == [] and ring.ok
    assert setup_commands(order, links, addresses=addresses) == {}
    entries = [[f"{ip}:{32323 + r}" for ip in ips] for r, ips in enumerate(ring.ips)]
    assert ring_hostfile(entries).startswith('[["192.168.200.10:32323"]')


def test_after_reboot_only_the_rebooted_mac_gets_commands():
    ports, addresses, bridges = captured({"studio-3": "ifconfig-after-reboot.txt"})
    links = cable_graph(ports)
    order = ring_order(ports, links)
    ring = ring_addresses(order, links, addresses)
    assert ring.missing == [RING_LINKS[1], RING_LINKS[2]] and not ring.ok
    assert ring.ips == [[], [], []]
    # studio-1 and studio-2 still hold .10/30 and .5/30: studio-3 takes the other ends.
    assert setup_commands(order, ring.missing, addresses=addresses, bridges=bridges) == {
        "studio-3": [
            DISABLE_BRIDGE,
            "sudo ifconfig bridge0 deletem en2",
            "sudo ifconfig bridge0 deletem en4",
            "sudo ifconfig en2 inet 192.168.200.9 netmask 255.255.255.252",
            "sudo route change 192.168.200.10 -interface en2",
            "sudo ifconfig en4 inet 192.168.200.6 netmask 255.255.255.252",
            "sudo route change 192.168.200.5 -interface en4",
        ]
    }


def test_fresh_cluster_setup_commands():
    order = ["studio-1", "studio-2", "studio-3"]
    assert setup_commands(order, RING_LINKS) == {
        "studio-1": [
            DISABLE_BRIDGE,
            "sudo ifconfig bridge0 deletem en2",
            "sudo ifconfig bridge0 deletem en3",
            "sudo ifconfig en2 inet 192.168.200.1 netmask 255.255.255.252",
            "sudo route change 192.168.200.2 -interface en2",
            "sudo ifconfig en3 inet 192.168.200.5 netmask 255.255.255.252",
            "sudo route change 192.168.200.6 -interface en3",
        ],
        "studio-2": [
            DISABLE_BRIDGE,
            "sudo ifconfig bridge0 deletem en3",
            "sudo ifconfig bridge0 deletem en2",
            "sudo ifconfig en3 inet 192.168.200.2 netmask 255.255.255.252",
            "sudo route change 192.168.200.1 -interface en3",
            "sudo ifconfig en2 inet 192.168.200.9 netmask 255.255.255.252",
            "sudo route change 192.168.200.10 -interface en2",
        ],
        "studio-3": [
            DISABLE_BRIDGE,
            "sudo ifconfig bridge0 deletem en2",
            "sudo ifconfig bridge0 deletem en4",
            "sudo ifconfig en2 inet 192.168.200.6 netmask 255.255.255.252",
            "sudo route change 192.168.200.5 -interface en2",
            "sudo ifconfig en4 inet 192.168.200.10 netmask 255.255.255.252",
            "sudo route change 192.168.200.9 -interface en4",
        ],
    }


def test_setup_only_for_the_cables_missing_addresses():
    # A square a-b-c-d with a diagonal a-c that the ring does not use.
    links = links_of("a-b", "b-c", "c-d", "a-d", "a-c")
    addresses = {
        "a": {"b0": ["192.168.200.1/30"], "d3": ["192.168.200.9/30"], "en0": ["10.20.0.11/24"]},
        "b": {"a0": ["192.168.200.2/30"], "c1": ["192.168.200.5/30"]},
        "c": {"b1": ["192.168.200.6/30"]},
        "d": {"a3": ["192.168.200.10/30"], "c2": ["169.254.3.4/16"]},
    }
    order = ring_order("abcd", links)
    assert order == ["a", "b", "c", "d"]
    ring = ring_addresses(order, links, addresses)
    assert ring.missing == [Link("c", "d2", "d", "c2")]
    commands = setup_commands(order, ring.missing, base="192.168.200.0", addresses=addresses)
    # .0/30, .4/30 and .8/30 are taken; d's 169.254/16 on the port is no /30 to complete.
    assert commands == {
        "c": [
            DISABLE_BRIDGE,
            "sudo ifconfig bridge0 deletem d2",
            "sudo ifconfig d2 inet 192.168.200.13 netmask 255.255.255.252",
            "sudo route change 192.168.200.14 -interface d2",
        ],
        "d": [
            DISABLE_BRIDGE,
            "sudo ifconfig bridge0 deletem c2",
            "sudo ifconfig c2 inet 192.168.200.14 netmask 255.255.255.252",
            "sudo route change 192.168.200.13 -interface c2",
        ],
    }
    # Passing every cable gives the same: working and non-ring cables are left alone.
    assert setup_commands(order, links, addresses=addresses) == commands


def test_setup_leaves_ports_outside_the_bridge_alone():
    links = links_of("a-b")
    bridges = {"a": {"bridge0": ["b0", "x9"]}, "b": {"bridge0": []}}
    assert setup_commands(["a", "b"], links, bridges=bridges) == {
        "a": [
            DISABLE_BRIDGE,
            "sudo ifconfig bridge0 deletem b0",
            "sudo ifconfig b0 inet 192.168.200.1 netmask 255.255.255.252",
            "sudo route change 192.168.200.2 -interface b0",
        ],
        "b": [
            DISABLE_BRIDGE,
            "sudo ifconfig a0 inet 192.168.200.2 netmask 255.255.255.252",
            "sudo route change 192.168.200.1 -interface a0",
        ],
    }


def test_setup_turns_the_thunderbolt_bridge_service_off_first():
    # Spelt out once: the service as macOS names it, turned off before any port leaves bridge0.
    commands = setup_commands(["studio-1", "studio-2", "studio-3"], RING_LINKS)
    for lines in commands.values():
        assert lines[0] == 'sudo networksetup -setnetworkserviceenabled "Thunderbolt Bridge" off'
        assert sum("networksetup" in line for line in lines) == 1
        assert all(line.startswith("sudo ") for line in lines)


@pytest.mark.parametrize(
    "bridges,expected_first",
    [
        ({"a": {}, "b": {}}, "sudo ifconfig b0 inet 192.168.200.1 netmask 255.255.255.252"),
        ({"a": {"bridge0": []}, "b": {}}, DISABLE_BRIDGE),
        ({"a": {"bridge0": ["b0"]}, "b": {}}, DISABLE_BRIDGE),
        (None, DISABLE_BRIDGE),  # unknown: macOS's own setup, every port in bridge0
    ],
    ids=["no-bridge", "empty-bridge", "bridged-port", "unknown"],
)
def test_setup_turns_the_service_off_only_where_a_bridge_exists(bridges, expected_first):
    commands = setup_commands(["a", "b"], links_of("a-b"), bridges=bridges)
    assert commands["a"][0] == expected_first


@pytest.mark.parametrize(
    "hosts,links,order",
    [
        ("a", [], ["a"]),
        ("ab", links_of("a-b"), ["a", "b"]),  # two hosts: one cable suffices
        ("ab", [], None),
        ("abc", links_of("a-b", "b-c", "c-a"), ["a", "b", "c"]),
        ("abcd", links_of("a-c", "c-b", "b-d", "d-a"), ["a", "c", "b", "d"]),
        ("abcd", links_of("a-b", "b-c", "c-d"), None),  # a line
        ("abcde", links_of("a-b", "b-c", "c-a", "c-d", "d-e", "e-c"), None),  # bowtie
        ("abcdefgh", links_of(*EIGHT), list("aecgbfdh")),
        ("hgfedcba", links_of(*EIGHT), list("aecgbfdh")),  # same answer whatever the input order
    ],
)
def test_ring_order(hosts, links, order):
    assert ring_order(hosts, links) == order


@pytest.mark.parametrize(
    "hosts,links,expected",
    [
        (
            ["studio-1", "studio-2", "studio-3", "studio-4"],
            [Link("studio-1", "en2", "studio-2", "en3"), Link("studio-2", "en2", "studio-3", "en3")]
            + [Link("studio-3", "en2", "studio-4", "en3")],
            "no Thunderbolt ring through all hosts: "
            "studio-1 has only one cable (to studio-2); a ring of 4 needs two per host; "
            "studio-4 has only one cable (to studio-3); a ring of 4 needs two per host. "
            "A cable between studio-1 and studio-4 would close the ring",
        ),
        (
            "abc",
            links_of("a-b", "b-c"),
            "no Thunderbolt ring through all hosts: a has only one cable (to b); a ring of 3 "
            "needs two per host; c has only one cable (to b); a ring of 3 needs two per host. "
            "A cable between a and c would close the ring",
        ),
        ("ab", [], "a and b are not cabled to each other; two hosts need one cable"),
        (
            "abc",
            links_of("a-b", "a-b", "b-c"),
            "no Thunderbolt ring through all hosts: a's 2 cables all go to b; a ring of 3 needs "
            "each host cabled to two different hosts; c has only one cable (to b); a ring of 3 "
            "needs two per host. A cable between a and c would close the ring",
        ),
        (
            "abcd",
            links_of("a-b", "b-c", "c-a"),
            "no Thunderbolt ring through all hosts: d has no Thunderbolt cable to another host",
        ),
        (
            "abcde",
            links_of("a-b", "b-c", "c-a", "c-d", "d-e", "e-c"),
            "no Thunderbolt ring through all hosts: c joins two separate loops; "
            "a ring cannot pass it twice. A cable between a and d would close the ring",
        ),
        (
            "abcdef",
            links_of("a-b", "b-c", "c-a", "d-e", "e-f", "f-d"),
            "no Thunderbolt ring through all hosts: the cables form 2 separate groups: "
            "a, b, c; d, e, f",
        ),
        ("abc", links_of("a-b", "b-c", "c-a"), ""),
        ([], [], "no hosts were given"),
    ],
)
def test_explain_no_ring(hosts, links, expected):
    assert explain_no_ring(hosts, links) == expected


def test_two_hosts_one_cable_addresses():
    links = [Link("a", "en2", "b", "en5")]
    addresses = {"a": {"en2": ["192.168.200.1/30"]}, "b": {"en5": ["192.168.200.2/30"]}}
    ring = ring_addresses(["a", "b"], links, addresses)
    assert ring.ips == [["192.168.200.1"], ["192.168.200.2"]] and ring.ok


def test_two_cables_between_neighbours_give_two_addresses_each():
    links = [Link("a", "en2", "b", "en2"), Link("a", "en3", "b", "en3")]
    addresses = {
        "a": {"en2": ["192.168.200.1/30"], "en3": ["192.168.200.5/30"]},
        "b": {"en2": ["192.168.200.2/30"], "en3": ["192.168.200.6/30"]},
    }
    ring = ring_addresses(["a", "b"], links, addresses)
    assert ring.ips == [["192.168.200.1", "192.168.200.5"], ["192.168.200.2", "192.168.200.6"]]


def test_every_rank_lists_as_many_addresses():
    # a-b has two cables, the rest one: the ring backend wants as many sockets left as right.
    links = [Link("a", "x", "b", "x"), Link("a", "y", "b", "y")] + links_of("b-c", "a-c")
    addresses = {
        "a": {"x": ["10.9.0.1/30"], "y": ["10.9.0.5/30"], "c1": ["10.9.0.13/30"]},
        "b": {"x": ["10.9.0.2/30"], "y": ["10.9.0.6/30"], "c0": ["10.9.0.9/30"]},
        "c": {"b0": ["10.9.0.10/30"], "a1": ["10.9.0.14/30"]},
    }
    ring = ring_addresses(["a", "b", "c"], links, addresses)
    assert ring.ips == [["10.9.0.13"], ["10.9.0.2"], ["10.9.0.10"]] and ring.ok


@pytest.mark.parametrize(
    "addresses,missing",
    [
        # Both of a's ports on 169.254/16: the kernel may send b's packets out of the c port.
        (
            {
                "a": {"b0": ["169.254.1.1/16"], "c2": ["169.254.1.2/16"]},
                "b": {"a0": ["169.254.2.1/16"], "c1": ["10.1.0.5/30"]},
                "c": {"a2": ["169.254.3.1/16"], "b1": ["10.1.0.6/30"]},
            },
            [Link("a", "b0", "b", "a0"), Link("a", "c2", "c", "a2")],
        ),
        # Addresses without a prefix cannot show a shared subnet.
        (
            {
                "a": {"b0": ["10.1.0.1/30"], "c2": ["10.1.0.9"]},
                "b": {"a0": ["10.1.0.2/30"], "c1": ["10.1.0.5/30"]},
                "c": {"a2": ["10.1.0.10"], "b1": ["10.1.0.6/30"]},
            },
            [Link("a", "c2", "c", "a2")],
        ),
        ({}, links_of("a-b", "b-c", "a-c")),
    ],
)
def test_missing_addresses(addresses, missing):
    ring = ring_addresses(["a", "b", "c"], links_of("a-b", "b-c", "a-c"), addresses)
    assert sorted(ring.missing) == sorted(missing) and not ring.ok


def test_link_local_on_a_single_port_is_usable():
    addresses = {"a": {"b0": ["169.254.7.1/16"]}, "b": {"a0": ["169.254.9.2/16"]}}
    ring = ring_addresses(["a", "b"], links_of("a-b"), addresses)
    assert ring.ips == [["169.254.7.1"], ["169.254.9.2"]]


def test_single_host_needs_no_addresses():
    ring = ring_addresses(["a"], [], {})
    assert ring.ips == [[]] and ring.ok
    assert setup_commands(["a"], []) == {}


def test_link_str():
    assert str(RING_LINKS[0]) == "studio-1:en2 <-> studio-2:en3"


def test_setup_reports_an_exhausted_base():
    addresses = {"a": {"lan": ["192.168.0.0/16"]}}
    with pytest.raises(ValueError, match="no free /30 from 192.168.200.0"):
        setup_commands(["a", "b"], links_of("a-b"), base="192.168.200.0", addresses=addresses)
