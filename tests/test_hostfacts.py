"""Host facts parsers on captured macOS and Linux output, and the collectors on fake runners.

tests/data/macos holds three Mac Studios cabled in a ring (see test_topology.py for the map):
studio-1 and studio-2 are M3 Ultra 512 GB, studio-3 is an M2 Ultra 192 GB.
"""

import json
from pathlib import Path

import pytest

from launcher.hostfacts import (
    FAKE_THUNDERBOLT_ENV,
    MACOS_COMMANDS,
    HostFacts,
    HostFactsError,
    ThunderboltPort,
    capture_name,
    capturing_runner,
    collect_linux,
    collect_macos,
    load_node_id,
    parse_bridge_members,
    parse_cpu_model,
    parse_gpu_cores,
    parse_hardware_ports,
    parse_ifconfig,
    parse_ip_addr_json,
    parse_meminfo,
    parse_sysctl,
    parse_thunderbolt,
    parse_vm_stat,
    replay_runner,
)

DATA = Path(__file__).parent / "data"
MACOS = DATA / "macos"
LINUX = DATA / "linux"
TB_JSON = "system_profiler-SPThunderboltDataType.json"
DISPLAYS_JSON = "system_profiler-SPDisplaysDataType.json"

# Thunderbolt domain uuids of the cabled buses (receptacle N is bus N-1).
S1_R1, S1_R2 = "6F1C2B7A-3D41-4E0B-9A55-0C8E2F4D1A01", "A83E90D2-5B17-4C6A-8E3F-7D21C4B9E602"
S2_R1, S2_R2 = "3B8D6E21-C4A7-4F19-9E53-1A2B7C8D4E11", "9F4A2C65-8B31-4D7E-A0F2-6C5E3D1B9A12"
S3_R1, S3_R3 = "F3A1C8E5-7B29-4D64-8E0F-2A9C5B1D7E21", "8D4B1F6A-3C57-4E92-A8D1-6F2C9E5B3A23"


def read(host: str, name: str) -> str:
    return (MACOS / host / name).read_text()


@pytest.mark.parametrize(
    "host,memsize,model,chip,version",
    [
        ("studio-1", 549755813888, "Mac15,14", "Apple M3 Ultra", "15.3.2"),
        ("studio-2", 549755813888, "Mac15,14", "Apple M3 Ultra", "15.3.2"),
        ("studio-3", 206158430208, "Mac14,14", "Apple M2 Ultra", "15.3.1"),
    ],
)
def test_parse_sysctl(host, memsize, model, chip, version):
    s = parse_sysctl(read(host, "sysctl.txt"))
    assert int(s["hw.memsize"]) == memsize
    assert (s["hw.model"], s["machdep.cpu.brand_string"]) == (model, chip)
    assert (s["kern.osproductversion"], s["kern.hostname"], s["hw.pagesize"]) == (
        version,
        host,
        "16384",
    )


@pytest.mark.parametrize(
    "host,available",
    [
        # (free + inactive + speculative + purgeable) pages * 16384
        ("studio-1", (29315712 + 1150093 + 86231 + 20117) * 16384),
        ("studio-2", (2981245 + 3822190 + 120044 + 4551) * 16384),
        ("studio-3", (10480233 + 700318 + 40127 + 1893) * 16384),
    ],
)
def test_parse_vm_stat(host, available):
    text = read(host, "vm_stat.txt")
    assert parse_vm_stat(text, 16384) == available
    assert parse_vm_stat(text) == available  # page size from the header


def test_vm_stat_numbers_are_exact():
    assert parse_vm_stat(read("studio-1", "vm_stat.txt")) == 500894154752
    assert parse_vm_stat(read("studio-2", "vm_stat.txt")) == 113508843520
    assert parse_vm_stat(read("studio-3", "vm_stat.txt")) == 183870603264


def test_parse_vm_stat_rejects_other_output():
    with pytest.raises(HostFactsError, match="Pages free"):
        parse_vm_stat("Mach Virtual Memory Statistics: (page size of 16384 bytes)\n")


@pytest.mark.parametrize(
    "host,peers",
    [
        # receptacle -> peer domain uuids; studio-1's receptacle 4 holds an SSD: not a peer
        ("studio-1", {"1": [S2_R2], "2": [S3_R1], "3": [], "4": [], "5": [], "6": []}),
        ("studio-2", {"1": [S3_R3], "2": [S1_R1], "3": [], "4": [], "5": [], "6": []}),
        ("studio-3", {"1": [S1_R2], "2": [], "3": [S2_R1], "4": [], "5": [], "6": []}),
    ],
)
def test_parse_thunderbolt(host, peers):
    buses = parse_thunderbolt(read(host, "system_profiler-SPThunderboltDataType.json"))
    assert {b["receptacle"]: b["peer_uuids"] for b in buses} == peers
    assert len({b["domain_uuid"] for b in buses}) == 6  # one domain per bus
    assert all(b["bus"] == f"thunderboltusb4_bus_{int(b['receptacle']) - 1}" for b in buses)


def test_parse_thunderbolt_speeds_and_errors():
    speeds = {b["receptacle"]: b["speed"] for b in parse_thunderbolt(read("studio-1", TB_JSON))}
    assert speeds["1"] == "80 Gb/s"  # M3 Ultra to M3 Ultra over Thunderbolt 5
    assert speeds["2"] == "40 Gb/s"  # to the M2 Ultra (Thunderbolt 4)
    assert speeds["6"] == "Up to 120 Gb/s"
    assert parse_thunderbolt('{"SPThunderboltDataType": []}') == []
    with pytest.raises(HostFactsError, match="not JSON"):
        parse_thunderbolt("system_profiler: command not found")


def test_parse_hardware_ports():
    ports = parse_hardware_ports(read("studio-1", "networksetup-listallhardwareports.txt"))
    assert ports == {
        "Ethernet": "en0",
        "Thunderbolt Bridge": "bridge0",
        "Wi-Fi": "en1",
        **{f"Thunderbolt {n}": f"en{n + 1}" for n in range(1, 7)},
    }


@pytest.mark.parametrize(
    "host,name,expected",
    [
        (
            "studio-1",
            "ifconfig.txt",
            {
                "lo0": ["127.0.0.1/8"],
                "en2": ["192.168.200.1/30"],
                "en3": ["192.168.200.10/30"],
                "en0": ["10.20.0.11/24"],
                "utun2": ["100.101.102.11/32"],  # point-to-point form: "inet A --> B netmask"
            },
        ),
        (
            "studio-2",
            "ifconfig.txt",
            {
                "lo0": ["127.0.0.1/8"],
                "en2": ["192.168.200.5/30"],
                "en3": ["192.168.200.2/30"],
                "en0": ["10.20.0.12/24"],
            },
        ),
        (
            "studio-3",
            "ifconfig.txt",
            {
                "lo0": ["127.0.0.1/8"],
                "en2": ["192.168.200.9/30"],
                "en4": ["192.168.200.6/30"],
                "en0": ["10.20.0.13/24"],
            },
        ),
        (
            "studio-3",
            "ifconfig-after-reboot.txt",
            {"lo0": ["127.0.0.1/8"], "en0": ["10.20.0.13/24"], "bridge0": ["169.254.71.203/16"]},
        ),
    ],
)
def test_parse_ifconfig(host, name, expected):
    assert parse_ifconfig(read(host, name)) == expected


def test_parse_ifconfig_tolerates_blank_lines():
    text = "en9: flags=8863<UP> mtu 1500\n\t\n\tinet 10.0.0.1 netmask 0xfffffffc\n"
    assert parse_ifconfig(text) == {"en9": ["10.0.0.1/30"]}


@pytest.mark.parametrize(
    "host,name,members",
    [
        ("studio-1", "ifconfig.txt", ["en4", "en5", "en6", "en7"]),
        ("studio-3", "ifconfig.txt", ["en3", "en5", "en6", "en7"]),
        ("studio-3", "ifconfig-after-reboot.txt", ["en2", "en3", "en4", "en5", "en6", "en7"]),
    ],
)
def test_parse_bridge_members(host, name, members):
    assert parse_bridge_members(read(host, name)) == {"bridge0": members}


@pytest.mark.parametrize(
    "text,cores",
    [
        (read("studio-1", DISPLAYS_JSON), 80),  # with a display attached
        (read("studio-3", DISPLAYS_JSON), 76),
        ('{"SPDisplaysDataType": [{"_name": "Kernel Driver"}]}', 0),
        ("{}", 0),
    ],
)
def test_parse_gpu_cores(text, cores):
    assert parse_gpu_cores(text) == cores


def test_parse_meminfo():
    # MemTotal 24684084 kB, MemAvailable 24008188 kB
    assert parse_meminfo((LINUX / "meminfo.txt").read_text()) == (25276502016, 24584384512)
    with pytest.raises(HostFactsError, match="MemAvailable"):
        parse_meminfo("MemTotal: 1024 kB\n")


@pytest.mark.parametrize(
    "name,expected",
    [
        ("ip-addr.json", {"lo": ["127.0.0.1/8"], "eth0": ["192.0.2.2/24"]}),
        (
            "ip-addr-netns.json",
            {"lo": ["127.0.0.1/8"], "tb1": ["192.168.200.1/30"], "tb2": ["169.254.20.7/16"]},
        ),
    ],
)
def test_parse_ip_addr_json(name, expected):
    assert parse_ip_addr_json((LINUX / name).read_text()) == expected


def test_parse_cpu_model():
    assert parse_cpu_model((LINUX / "cpuinfo.txt").read_text()) == "AMD EPYC"
    assert parse_cpu_model("processor\t: 0\nBogoMIPS\t: 48.00\n") == ""


def macos_runner(host: str, ifconfig: str = "ifconfig.txt"):
    """Replays a capture folder (as `mlxdist doctor --from` does), ifconfig from another file."""
    calls = []
    replay = replay_runner(MACOS / host)

    def run(argv: list[str]) -> str:
        calls.append(argv)
        if capture_name(argv) == "ifconfig.txt":
            return read(host, ifconfig)
        return replay(argv)

    return run, calls


def test_capture_then_replay(tmp_path):
    run, _ = macos_runner("studio-1")
    kept = collect_macos(capturing_runner(run, tmp_path / "capture"), tmp_path / "id")
    names = sorted(p.name for p in (tmp_path / "capture").iterdir())
    assert names == sorted(set(MACOS_COMMANDS) - {"ibv_devices.txt"})  # not in this capture
    again = collect_macos(replay_runner(tmp_path / "capture"), tmp_path / "id")
    assert again == kept


def test_collect_macos(tmp_path):
    run, calls = macos_runner("studio-1")
    facts = collect_macos(run, tmp_path / "node_id")
    assert all(argv[0].startswith("/") for argv in calls if argv != ["ibv_devices"])
    assert (facts.rdma_devices, facts.wired_limit_mb, facts.gpu_working_set) == ([], 0, 0)
    assert facts.hostname == "studio-1"
    assert (facts.chip, facts.gpu_cores, facts.os) == ("Apple M3 Ultra", 80, "macOS 15.3.2")
    assert (facts.memory_total, facts.memory_available) == (549755813888, 500894154752)
    assert facts.node_id == load_node_id(tmp_path / "node_id")
    assert facts.bridges == {"bridge0": ["en4", "en5", "en6", "en7"]}
    assert [(p.interface, p.hardware_port, p.ip) for p in facts.thunderbolt] == [
        ("en2", "Thunderbolt 1", "192.168.200.1"),
        ("en3", "Thunderbolt 2", "192.168.200.10"),
        ("en4", "Thunderbolt 3", None),
        ("en5", "Thunderbolt 4", None),
        ("en6", "Thunderbolt 5", None),
        ("en7", "Thunderbolt 6", None),
    ]
    assert facts.thunderbolt[0] == ThunderboltPort(
        "en2", "Thunderbolt 1", "192.168.200.1", S1_R1, [S2_R2], "80 Gb/s"
    )
    # The negotiated rate of a cabled port (to studio-3, an M2 Ultra: Thunderbolt 4, 40 Gb/s);
    # port 4 holds a drive at 40 Gb/s; an idle port says what it could reach.
    idle = "Up to 120 Gb/s"
    speeds = [p.speed for p in facts.thunderbolt]
    assert speeds == ["80 Gb/s", "40 Gb/s", idle, "40 Gb/s", idle, idle]


def test_host_facts_round_trip(tmp_path):
    run, _ = macos_runner("studio-3", "ifconfig-after-reboot.txt")
    facts = collect_macos(run, tmp_path / "node_id")
    wire = json.loads(json.dumps(facts.to_dict()))
    assert HostFacts.from_dict(wire) == facts
    # Fields a newer agent adds are ignored; bridges is optional for older ones.
    wire["future_field"] = 1
    del wire["bridges"]
    assert HostFacts.from_dict(wire).thunderbolt == facts.thunderbolt


def test_node_id_is_created_once(tmp_path):
    path = tmp_path / "state" / "node_id"
    first = load_node_id(path)
    assert load_node_id(path) == first
    assert path.read_text().strip() == first
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    path.write_text("not a uuid\n")
    with pytest.raises(HostFactsError, match="remove it"):
        load_node_id(path)


def linux_fakes():
    files = {"/proc/meminfo": "meminfo.txt", "/proc/cpuinfo": "cpuinfo.txt"}

    def run(argv):
        assert argv == ["ip", "-j", "addr"]
        return (LINUX / "ip-addr-netns.json").read_text()

    return run, lambda path: (LINUX / files[path]).read_text()


def test_collect_linux(tmp_path):
    run, read_file = linux_fakes()
    facts = collect_linux(run, read_file, tmp_path / "node_id", env={})
    assert (facts.chip, facts.gpu_cores, facts.thunderbolt) == ("AMD EPYC", 0, [])
    assert (facts.memory_total, facts.memory_available) == (25276502016, 24584384512)
    assert facts.os.startswith("Linux ")
    assert facts.addresses["tb1"] == ["192.168.200.1/30"]


def test_fake_thunderbolt_hook(tmp_path):
    ports = [
        {"interface": "tb1", "hardware_port": "Thunderbolt 1", "ip": None, "domain_uuid": "A-1"},
        {
            "interface": "tb2",
            "hardware_port": "Thunderbolt 2",
            "ip": "169.254.20.9",
            "domain_uuid": "A-2",
            "peer_uuids": ["B-1"],
        },
    ]
    fake = tmp_path / "ports.json"
    fake.write_text(json.dumps(ports))
    run, read_file = linux_fakes()
    facts = collect_linux(run, read_file, tmp_path / "id", env={FAKE_THUNDERBOLT_ENV: str(fake)})
    assert facts.thunderbolt == [
        ThunderboltPort("tb1", "Thunderbolt 1", "192.168.200.1", "A-1", []),  # ip from ip -j addr
        ThunderboltPort("tb2", "Thunderbolt 2", "169.254.20.9", "A-2", ["B-1"]),  # given ip kept
    ]
    fake.write_text('{"interface": "tb1"}')
    with pytest.raises(HostFactsError, match=FAKE_THUNDERBOLT_ENV):
        collect_linux(run, read_file, tmp_path / "id", env={FAKE_THUNDERBOLT_ENV: str(fake)})
