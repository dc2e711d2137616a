"""The agent's advertisement and the control plane's addresses, without a network: the TXT record
fits zeroconf's limits for every captured Mac (tests/data/macos, real captures included), the
facts digest, and which interfaces an agent listens on by default (docs/network.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from zeroconf import BadTypeInNameException, ServiceInfo
from zeroconf._utils.name import service_type_name

from launcher.discovery import (
    MAX_ENTRY,
    MAX_TXT,
    SERVICE,
    AdvertiseError,
    Agent,
    facts_digest,
    nearest_first,
    txt_record,
    txt_size,
)
from launcher.hostfacts import (
    MACOS_COMMANDS,
    OPTIONAL_COMMANDS,
    HostFacts,
    ThunderboltPort,
    collect_macos,
    lan_devices,
    parse_hardware_ports,
    parse_ibv_devices,
    parse_ifconfig,
    parse_sysctl,
    parse_thunderbolt,
    replay_runner,
    replayed_here,
)
from launcher.interfaces import (
    BRIDGE_WARNING,
    InterfaceError,
    default_interfaces,
    listen_addresses,
)
from quantize.errors import UserError

MACOS = Path(__file__).parent / "data" / "macos"
NODE_ID = "6f0c1e52-3b7a-4d0e-9a51-2c8e7f4b1d90"
VERSIONS = {"mlx_version": "0.32.0", "mlxdist_version": "0.1.0"}


def capture_folders() -> list[Path]:
    """Every folder under tests/data/macos holding a command's output, new ones included."""
    names = set(MACOS_COMMANDS)
    return sorted({p.parent for p in MACOS.rglob("*") if p.name in names})


def facts_of(folder: Path, tmp_path: Path) -> dict:
    """The facts an agent on that Mac would advertise: all of them from a whole capture, else
    what the folder's files give (a published capture is often one command's output)."""
    files = {p.name for p in folder.iterdir()}
    if set(MACOS_COMMANDS) - OPTIONAL_COMMANDS <= files:
        facts = collect_macos(replay_runner(folder), tmp_path / "node_id", working_set=lambda: 0)
        return facts.to_dict() | VERSIONS
    facts: dict = dict(VERSIONS)
    read = {name: (folder / name).read_text() for name in files}
    if "sysctl.txt" in read:
        sysctl = parse_sysctl(read["sysctl.txt"])
        facts |= {
            "hostname": sysctl.get("kern.hostname", ""),
            "chip": sysctl.get("machdep.cpu.brand_string", ""),
        }
    if "ifconfig.txt" in read:
        facts["addresses"] = parse_ifconfig(read["ifconfig.txt"])
    if "system_profiler-SPThunderboltDataType.json" in read:
        facts["thunderbolt"] = parse_thunderbolt(read["system_profiler-SPThunderboltDataType.json"])
    if "ibv_devices.txt" in read:
        facts["rdma_devices"] = parse_ibv_devices(read["ibv_devices.txt"])
    return facts


def zeroconf_info(txt: dict[str, str], node_id: str = NODE_ID) -> ServiceInfo:
    """What Advertiser registers, built by zeroconf itself (no socket is opened)."""
    return ServiceInfo(
        SERVICE,
        f"{node_id}.{SERVICE}",
        addresses=[bytes([10, 20, 0, 11])],
        port=52417,
        properties=txt,
        server=f"{node_id}.local.",
    )


def test_the_captures_include_a_six_port_studio_and_a_three_port_macbook(tmp_path):
    ports = {f.name: len(facts_of(f, tmp_path).get("thunderbolt", [])) for f in capture_folders()}
    assert ports["studio-1"] == 6 and ports["macbook-3port"] == 3


@pytest.mark.parametrize("folder", capture_folders(), ids=lambda p: str(p.relative_to(MACOS)))
def test_the_advertisement_fits_zeroconf_for_every_captured_mac(folder, tmp_path):
    facts = facts_of(folder, tmp_path)
    txt = txt_record("home", NODE_ID, 52417, facts)
    assert "tb" not in txt and set(txt) == {
        "cluster",
        "id",
        "port",
        "host",
        "os",
        "mlx",
        "mlxdist",
        "facts",
    }
    assert all(len(f"{k}={v}".encode()) <= MAX_ENTRY for k, v in txt.items())
    assert txt_size(txt) <= MAX_TXT
    info = zeroconf_info(txt)
    assert len(info.text) == txt_size(txt)  # our count is zeroconf's wire size
    assert service_type_name(info.name) == SERVICE  # the instance label passes zeroconf's check
    decoded = {k.decode(): v.decode() for k, v in info.properties.items()}
    assert decoded == txt
    assert txt["facts"] == facts_digest(facts) and len(txt["facts"]) == 16
    assert txt["host"] == facts.get("hostname", "")


def test_the_old_thunderbolt_list_would_not_have_fit_on_studio_1(tmp_path):
    # What the TXT record used to carry for a 6-port Mac Studio: one entry past zeroconf's limit.
    ports = facts_of(MACOS / "studio-1", tmp_path)["thunderbolt"]
    old = json.dumps(
        [[p["interface"], p["ip"], p["domain_uuid"], p["peer_uuids"]] for p in ports],
        separators=(",", ":"),
    )
    with pytest.raises(ValueError):
        zeroconf_info({"tb": old})


@pytest.mark.parametrize("value_bytes,fits", [(253, True), (254, False)])
def test_zeroconf_limits_the_whole_entry_to_255_bytes(value_bytes, fits):
    # "k=" plus the value: 255 bytes is the most one length byte can say.
    txt = {"k": "x" * value_bytes}
    if fits:
        assert len(zeroconf_info(txt).text) == 1 + MAX_ENTRY
    else:
        with pytest.raises(ValueError):
            zeroconf_info(txt)


@pytest.mark.parametrize(
    "hostname",
    ["h" * 300, "ü" * 200, "studio-" + "é" * 180],
    ids=["ascii", "two-byte", "mixed"],
)
def test_a_long_host_name_is_cut_to_fit(hostname):
    txt = txt_record("home", NODE_ID, 52417, {"hostname": hostname, **VERSIONS})
    assert hostname.startswith(txt["host"]) and 0 < len(txt["host"]) < len(hostname)
    assert len(f"host={txt['host']}".encode()) <= MAX_ENTRY and txt_size(txt) <= MAX_TXT
    zeroconf_info(txt)  # zeroconf accepts it


def test_a_cluster_name_that_cannot_fit_is_a_clear_error():
    with pytest.raises(AdvertiseError, match="cluster name .* at most 255 fit"):
        txt_record("c" * 250, NODE_ID, 52417, VERSIONS)
    assert issubclass(AdvertiseError, UserError)


def test_a_long_cluster_name_leaves_the_host_name_less_room():
    txt = txt_record("c" * 240, NODE_ID, 52417, {"hostname": "h" * 200, **VERSIONS})
    assert txt["cluster"] == "c" * 240 and txt_size(txt) <= MAX_TXT
    assert len(txt["host"]) < 200


def test_a_node_id_over_one_dns_label_is_a_clear_error():
    with pytest.raises(AdvertiseError, match="over 63 bytes"):
        txt_record("home", "n" * 64, 52417, VERSIONS)
    with pytest.raises(BadTypeInNameException):  # what zeroconf itself would have said
        service_type_name(f"{'n' * 64}.{SERVICE}")


def test_the_digest_covers_the_stable_facts_only(tmp_path):
    facts = facts_of(MACOS / "studio-1", tmp_path)
    digest = facts_digest(facts)
    assert facts_digest(json.loads(json.dumps(facts))) == digest  # as the signed API returns it
    assert facts_digest(facts | {"memory_available": 1}) == digest
    assert facts_digest(facts | {"listen": ["10.0.0.1"]}) == digest
    addressed = json.loads(json.dumps(facts))  # the ring setup gave a cable its /30
    addressed["thunderbolt"][4] |= {"ip": "192.168.200.9", "speed": "80 Gb/s"}
    assert facts_digest(addressed) == digest
    moved = json.loads(json.dumps(facts))
    moved["thunderbolt"][4]["peer_uuids"] = ["A-NEW-CABLE"]
    for changed in (moved, facts | {"memory_total": 1}, facts | {"rdma_devices": ["rdma_en2"]}):
        assert facts_digest(changed) != digest


def test_an_agent_tells_whether_facts_are_what_it_advertised(tmp_path):
    facts = facts_of(MACOS / "macbook-3port", tmp_path)
    txt = txt_record("home", NODE_ID, 52417, facts)
    agent = Agent(NODE_ID, "home", ["192.168.1.42"], 52417, txt)
    assert agent.advertised(facts)
    assert not agent.advertised(facts | {"memory_total": 64 * 2**30})
    assert Agent(NODE_ID, "home", ["192.168.1.42"], 52417, {"id": NODE_ID}).advertised({})


@pytest.mark.parametrize(
    "ports,expected",
    [
        (
            {
                "Ethernet": "en0",
                "Thunderbolt Bridge": "bridge0",
                "Wi-Fi": "en1",
                "Thunderbolt 1": "en2",
            },
            ["en0", "en1"],
        ),
        (
            {"Wi-Fi": "en0", "USB 10/100/1000 LAN": "en7", "Thunderbolt Ethernet Slot 0": "en5"},
            ["en7", "en5", "en0"],
        ),
        ({"AirPort": "en1", "Bluetooth PAN": "en6", "iPhone USB": "en8"}, ["en1"]),
        ({"Thunderbolt 1": "en1", "Thunderbolt 2": "en2", "Thunderbolt Bridge": "bridge0"}, []),
    ],
    ids=["studio", "adapters", "old-wifi-name", "cables-only"],
)
def test_lan_devices(ports, expected):
    assert lan_devices(ports) == expected


def test_lan_devices_from_the_captures():
    def lan(folder: str) -> list[str]:
        text = (MACOS / folder / "networksetup-listallhardwareports.txt").read_text()
        return lan_devices(parse_hardware_ports(text))

    assert lan("studio-1") == ["en0", "en1"]
    assert lan("macbook-3port") == ["en0"]


def host(lan=(), addresses=None, cabled=()) -> HostFacts:
    """A Mac with Thunderbolt ports en2/en3 (those in cabled addressed from addresses)."""
    addresses = addresses or {}
    ports = [
        ThunderboltPort(
            i,
            f"Thunderbolt {n}",
            addresses[i][0].split("/")[0] if i in addresses else None,
            f"d{n}",
        )
        for n, i in ((1, "en2"), (2, "en3"))
    ]
    return HostFacts(
        "id", "mac", "Apple M3 Ultra", 1, 1, 80, "macOS 15", ports, addresses, lan=list(lan)
    )


BRIDGE = {"bridge0": ["169.254.31.7/16"]}
CABLES = {"en2": ["192.168.200.1/30"], "en3": ["192.168.200.10/30"]}


@pytest.mark.parametrize(
    "facts,interfaces,warning",
    [
        (host(["en0", "en1"], {"en0": ["10.20.0.11/24"], **CABLES, **BRIDGE}), ["en0"], None),
        (host(["en0", "en1"], {"en1": ["192.168.1.42/24"], **BRIDGE}), ["en1"], None),
        (host(["en0"], {"en0": ["169.254.4.4/16"], **CABLES}), ["en2", "en3"], None),
        (host(["en0"], {"en0": ["10.1.1.1/8"]} | CABLES), ["en0"], None),
        (host(["en2"], CABLES | BRIDGE), ["en2", "en3"], None),  # a LAN name that is a cable
        (host(["bridge0"], BRIDGE), ["bridge0"], BRIDGE_WARNING),
        (host([], {"en2": ["192.168.200.1/30"]}), ["en2"], None),
        (host(["en0"], BRIDGE), ["bridge0"], BRIDGE_WARNING),
        (host(["en0"], {"lo0": ["127.0.0.1/8"]}), [], None),
        # Self-assigned on an unbridged port: the ring setup replaces it, cutting the agent off.
        (host([], {"en2": ["169.254.7.9/16"]} | BRIDGE), ["bridge0"], BRIDGE_WARNING),
        (host([], {"en2": ["169.254.7.9/16"]}), [], None),
    ],
    ids=[
        "ethernet",
        "wifi",
        "link-local-lan",
        "lan-before-cables",
        "lan-name-is-a-port",
        "bridge-only",
        "one-cable",
        "bridge-last",
        "nothing",
        "self-assigned-cable",
        "self-assigned-cable-only",
    ],
)
def test_default_interfaces(facts, interfaces, warning):
    assert default_interfaces(facts) == (interfaces, warning)


def test_listen_addresses_warns_about_the_bridge_and_refuses_nothing():
    said: list[str] = []
    assert listen_addresses(host([], BRIDGE), [], said.append) == ["169.254.31.7"]
    assert said == [BRIDGE_WARNING]
    said.clear()
    assert listen_addresses(host([], BRIDGE), ["bridge0"], said.append) == ["169.254.31.7"]
    assert said == []  # named by the user: no warning
    with pytest.raises(InterfaceError, match="give --interface"):
        listen_addresses(host(["en0"], {}), [], said.append)
    with pytest.raises(InterfaceError, match="en9 has no IPv4"):
        listen_addresses(host(["en0"], BRIDGE), ["en9"], said.append)


@pytest.mark.parametrize(
    "folder,listen",
    [("studio-1", ["10.20.0.11"]), ("macbook-3port", ["192.168.1.42"])],
)
def test_captured_macs_listen_on_their_lan(folder, listen, tmp_path):
    facts = collect_macos(replay_runner(MACOS / folder), tmp_path / "id", working_set=lambda: 0)
    said: list[str] = []
    assert listen_addresses(facts, [], said.append) == listen and said == []


def test_a_capture_replayed_on_this_machines_addresses(tmp_path):
    here = {"lo": ["127.0.0.1/8"], "eth0": ["169.254.100.2/16"]}
    facts = replayed_here(MACOS / "studio-1", tmp_path / "id", here)
    assert (facts.hostname, facts.chip, facts.memory_total) == (
        "studio-1",
        "Apple M3 Ultra",
        512 * 2**30,
    )
    assert facts.addresses == here and facts.bridges == {}
    assert len(facts.thunderbolt) == 6 and all(p.ip is None for p in facts.thunderbolt)
    assert listen_addresses(facts, ["eth0"]) == ["169.254.100.2"]


@pytest.mark.parametrize(
    "addresses,local,expected",
    [
        # Over cables alone: studio-2 advertises both its /30 ends; studio-1 reaches only .2.
        (
            ["192.168.200.9", "192.168.200.2"],
            ["192.168.200.1", "192.168.200.5"],
            ["192.168.200.2", "192.168.200.9"],
        ),
        (
            ["192.168.200.6", "192.168.200.10"],
            ["192.168.200.1", "192.168.200.5"],
            ["192.168.200.6", "192.168.200.10"],
        ),
        # A LAN address before a link-local one.
        (["169.254.31.7", "10.20.0.12"], ["10.20.0.11"], ["10.20.0.12", "169.254.31.7"]),
        (["10.0.0.2", "10.0.0.3"], [], ["10.0.0.2", "10.0.0.3"]),
    ],
    ids=["cable-a", "cable-b", "lan", "no-local"],
)
def test_an_agents_reachable_address_comes_first(addresses, local, expected):
    assert nearest_first(addresses, local) == expected
