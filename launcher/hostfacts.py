"""What a node knows about itself: chip, memory, GPU cores, addresses and Thunderbolt ports.

The parsers are pure and tested on captured command output (tests/data/macos, tests/data/linux);
collect_macos / collect_linux only run fixed commands and feed the parsers.

Addresses are kept in interface form, "192.168.200.1/30", because the topology needs the prefix
to tell whether the two ends of a cable share a subnet.
"""

from __future__ import annotations

import ipaddress
import json
import os
import platform
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from quantize.errors import UserError

DEFAULT_NODE_ID_PATH = Path.home() / ".mlxdist" / "node_id"
FAKE_THUNDERBOLT_ENV = "MLXDIST_FAKE_THUNDERBOLT"
FACTS_FROM_ENV = "MLXDIST_FACTS_FROM"  # a capture folder: its Mac's facts (tests' stand-in Macs)

Runner = Callable[[list[str]], str]
Reader = Callable[[str], str]


class HostFactsError(UserError):
    """A command's output could not be understood; the message says which and why."""


@dataclass
class ThunderboltPort:
    interface: str  # "en2"
    hardware_port: str  # "Thunderbolt 1"
    ip: str | None  # first IPv4 address on the interface, without prefix
    domain_uuid: str  # this port's own Thunderbolt domain (one per bus on Apple Silicon)
    peer_uuids: list[str] = field(default_factory=list)  # domains of the Macs cabled to it
    # The receptacle's speed as system_profiler gives it: the negotiated rate with a cable in
    # ("80 Gb/s" is Thunderbolt 5, "40 Gb/s" 4), "Up to 120 Gb/s" on an idle port.
    speed: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> ThunderboltPort:
        return cls(
            interface=d["interface"],
            hardware_port=d.get("hardware_port", ""),
            ip=d.get("ip"),
            domain_uuid=d["domain_uuid"],
            peer_uuids=list(d.get("peer_uuids", [])),
            speed=str(d.get("speed", "")),
        )


@dataclass
class HostFacts:
    node_id: str
    hostname: str
    chip: str
    memory_total: int  # bytes
    memory_available: int  # bytes
    gpu_cores: int
    os: str
    thunderbolt: list[ThunderboltPort]
    addresses: dict[str, list[str]]  # interface -> IPv4 addresses as "a.b.c.d/prefix"
    # bridge -> member interfaces; tells setup commands which ports sit in the Thunderbolt Bridge
    bridges: dict[str, list[str]] = field(default_factory=dict)
    rdma_devices: list[str] = field(default_factory=list)  # "rdma_en2", as ibv_devices lists them
    wired_limit_mb: int = 0  # sysctl iogpu.wired_limit_mb: 0 leaves Metal at its own limit
    gpu_working_set: int = 0  # Metal's recommended working set in bytes; 0 when unknown
    lan: list[str] = field(default_factory=list)  # Ethernet and Wi-Fi devices, wired first

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> HostFacts:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["thunderbolt"] = [ThunderboltPort.from_dict(p) for p in d.get("thunderbolt", [])]
        values["addresses"] = {k: list(v) for k, v in d.get("addresses", {}).items()}
        values["bridges"] = {k: list(v) for k, v in d.get("bridges", {}).items()}
        values["rdma_devices"] = [str(x) for x in d.get("rdma_devices", [])]
        values["lan"] = [str(x) for x in d.get("lan", [])]
        return cls(**values)


# ---- macOS parsers ----


def parse_sysctl(text: str) -> dict[str, str]:
    """`sysctl name ...` output ("hw.memsize: 549755813888" lines) -> {name: value}."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def parse_vm_stat(text: str, page_size: int | None = None) -> int:
    """Bytes macOS can give a new allocation: free + inactive + speculative + purgeable pages.

    page_size defaults to the one in vm_stat's header (16384 on Apple Silicon). Purgeable pages
    also sit on the active/inactive queues, so this can overstate by that (small) count.
    """
    pages = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip().rstrip(".").isdigit():
            pages[key.strip().strip('"')] = int(value.strip().rstrip("."))
    if page_size is None:
        m = re.search(r"page size of (\d+) bytes", text)
        if not m:
            raise HostFactsError("vm_stat output has no page size")
        page_size = int(m.group(1))
    wanted = ["Pages free", "Pages inactive", "Pages speculative", "Pages purgeable"]
    missing = [k for k in wanted if k not in pages]
    if missing:
        raise HostFactsError(f"vm_stat output has no {', '.join(missing)} line")
    return sum(pages[k] for k in wanted) * page_size


def parse_thunderbolt(json_text: str) -> list[dict]:
    """`system_profiler SPThunderboltDataType -json` -> one dict per bus (one receptacle each).

    Keys: bus, receptacle (the receptacle_id_key, e.g. "1"), domain_uuid, peer_uuids, speed.
    A connected Mac appears in the bus's _items with its own domain_uuid_key; a drive or a
    display has none, so it is not a peer.
    """
    buses = []
    for bus in _profiler_items(json_text, "SPThunderboltDataType"):
        domain = bus.get("domain_uuid_key")
        if not domain or not isinstance(domain, str):
            continue
        receptacle = _dict(bus.get("receptacle_1_tag"))
        items = [i for i in _list(bus.get("_items")) if isinstance(i, dict)]
        peers = [str(i["domain_uuid_key"]) for i in items if i.get("domain_uuid_key")]
        buses.append(
            {
                "bus": str(bus.get("_name", "")),
                "receptacle": receptacle.get("receptacle_id_key"),
                "domain_uuid": domain,
                "peer_uuids": peers,
                "speed": str(receptacle.get("current_speed_key", "")),
            }
        )
    return buses


def _profiler_items(json_text: str, data_type: str) -> list[dict]:
    """The entries of `system_profiler DATATYPE -json` output; a HostFactsError when it is not
    that shape (so a damaged capture is one line, not a traceback)."""
    try:
        data = json.loads(json_text)
    except json.JSONDecodeError as e:
        raise HostFactsError(f"system_profiler {data_type} output is not JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get(data_type, []), list):
        raise HostFactsError(f"system_profiler {data_type} output has no {data_type} list")
    return [entry for entry in data.get(data_type, []) if isinstance(entry, dict)]


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value) -> list:
    return value if isinstance(value, list) else []


def parse_hardware_ports(text: str) -> dict[str, str]:
    """`networksetup -listallhardwareports` -> {"Thunderbolt 1": "en2", ...} (port -> device)."""
    ports = {}
    name = None
    for line in text.splitlines():
        if line.startswith("Hardware Port:"):
            name = line.partition(":")[2].strip()
        elif line.startswith("Device:") and name is not None:
            ports[name] = line.partition(":")[2].strip()
            name = None
    return ports


def _ifconfig_blocks(text: str) -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^(\S+): flags=", line)
        if m:
            current = m.group(1)
            blocks[current] = []
        elif current is not None and line[:1].isspace():
            blocks[current].append(line.strip())
    return blocks


def parse_ifconfig(text: str) -> dict[str, list[str]]:
    """macOS `ifconfig` -> {iface: ["a.b.c.d/prefix", ...]}, only interfaces with IPv4."""
    out = {}
    for iface, lines in _ifconfig_blocks(text).items():
        addrs = []
        for line in lines:
            words = line.split()
            if words[:1] != ["inet"]:
                continue
            prefix = 32
            if "netmask" in words:
                prefix = bin(int(words[words.index("netmask") + 1], 16)).count("1")
            addrs.append(f"{words[1]}/{prefix}")
        if addrs:
            out[iface] = addrs
    return out


def parse_bridge_members(text: str) -> dict[str, list[str]]:
    """macOS `ifconfig` -> {bridge: [member interfaces]} from the "member:" lines."""
    out = {}
    for iface, lines in _ifconfig_blocks(text).items():
        members = [line.split()[1] for line in lines if line.startswith("member:")]
        if members or iface.startswith("bridge"):
            out[iface] = members
    return out


def parse_ibv_devices(text: str) -> list[str]:
    """`ibv_devices` -> the RDMA devices MLX's JACCL can use ("rdma_en2", ...), in listed order.

    The table's first column is the device name; macOS 26.2+ names Thunderbolt RDMA devices
    after their interface with an "rdma_" prefix, which is what mlx.distributed_config looks for.
    """
    names = [line.split()[0] for line in text.splitlines() if line.split()]
    return [n for n in names if n.startswith("rdma_")]


def parse_gpu_cores(json_text: str) -> int:
    """`system_profiler SPDisplaysDataType -json` -> GPU core count (sppci_cores), 0 if absent."""
    for gpu in _profiler_items(json_text, "SPDisplaysDataType"):
        cores = str(gpu.get("sppci_cores", ""))
        if cores.isdigit():
            return int(cores)
    return 0


# ---- Linux parsers ----


def parse_meminfo(text: str) -> tuple[int, int]:
    """/proc/meminfo -> (MemTotal, MemAvailable) in bytes."""
    kb = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        words = value.split()
        if words and words[0].isdigit():
            kb[key] = int(words[0])
    if "MemTotal" not in kb or "MemAvailable" not in kb:
        raise HostFactsError("/proc/meminfo has no MemTotal or MemAvailable line")
    return kb["MemTotal"] * 1024, kb["MemAvailable"] * 1024


def parse_ip_addr_json(text: str) -> dict[str, list[str]]:
    """`ip -j addr` -> {iface: ["a.b.c.d/prefix", ...]}, only interfaces with IPv4."""
    out = {}
    for link in json.loads(text):
        addrs = [
            f"{a['local']}/{a['prefixlen']}"
            for a in link.get("addr_info", [])
            if a.get("family") == "inet"
        ]
        if addrs:
            out[link["ifname"]] = addrs
    return out


def parse_cpu_model(text: str) -> str:
    """/proc/cpuinfo -> the first "model name" (empty if the kernel gives none, as on some ARM)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return ""


# ---- assembling facts ----


def thunderbolt_ports(
    buses: list[dict], hardware_ports: Mapping[str, str], addresses: Mapping[str, list[str]]
) -> list[ThunderboltPort]:
    """Join buses to interfaces: receptacle N is the hardware port "Thunderbolt N"."""
    ports = []
    for bus in sorted(buses, key=lambda b: str(b["receptacle"]).zfill(4)):
        name = f"Thunderbolt {bus['receptacle']}"
        iface = hardware_ports.get(name)
        # A receptacle whose network service was removed has no interface; it cannot carry IP.
        if iface is None:
            continue
        ip = first_ip(addresses, iface)
        ports.append(
            ThunderboltPort(
                iface, name, ip, bus["domain_uuid"], list(bus["peer_uuids"]), bus.get("speed", "")
            )
        )
    return ports


def lan_devices(hardware_ports: Mapping[str, str]) -> list[str]:
    """The LAN among networksetup's hardware ports: Ethernet (adapters too: "Thunderbolt
    Ethernet", "USB 10/100/1000 LAN") before Wi-Fi; never a Thunderbolt port or the bridge."""
    wired, wireless = [], []
    for name, device in hardware_ports.items():
        if re.fullmatch(r"Thunderbolt \d+|Thunderbolt Bridge", name) or device.startswith("bridge"):
            continue
        if "Ethernet" in name or re.search(r"\bLAN\b", name):
            wired.append(device)
        elif name in ("Wi-Fi", "AirPort"):
            wireless.append(device)
    return wired + wireless


def first_ip(addresses: Mapping[str, list[str]], iface: str) -> str | None:
    addrs = addresses.get(iface, [])
    return str(ipaddress.ip_interface(addrs[0]).ip) if addrs else None


def load_node_id(path: Path = DEFAULT_NODE_ID_PATH) -> str:
    """This node's id: a UUID written to path the first time and read back ever after."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(str(uuid.uuid4()) + "\n")
        try:
            os.link(tmp, path)  # atomic and refuses to replace: two first starts agree on one id
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    text = path.read_text().strip()
    try:
        return str(uuid.UUID(text))
    except ValueError:
        message = f"{path} does not hold a node id (a UUID); remove it to make a new one"
        raise HostFactsError(message) from None


def run_command(argv: list[str], timeout: float = 30.0) -> str:
    """Stdout of a fixed command (no shell); a failure becomes a HostFactsError. sysctl's
    answer stands when it names an unknown key (it exits 1 but prints the known ones)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        raise HostFactsError(f"{argv[0]} failed: {e}") from e
    if done.returncode != 0 and not (argv[0].endswith("sysctl") and done.stdout.strip()):
        raise HostFactsError(f"{argv[0]} failed with exit code {done.returncode}")
    return done.stdout


def read_text(path: str) -> str:
    return Path(path).read_text()


SYSCTL_KEYS = [
    "hw.memsize",
    "hw.pagesize",
    "hw.model",
    "machdep.cpu.brand_string",
    "kern.osproductversion",
    "kern.hostname",
    "iogpu.wired_limit_mb",  # absent before macOS 14: sysctl then names it unknown and exits 1
]

# Each command collect_macos runs, under the file name a capture keeps its output in
# (`mlxdist doctor --capture DIR` writes them, `--from DIR` replays them).
MACOS_COMMANDS: dict[str, list[str]] = {
    "sysctl.txt": ["/usr/sbin/sysctl", *SYSCTL_KEYS],
    "ifconfig.txt": ["/sbin/ifconfig"],
    "networksetup-listallhardwareports.txt": ["/usr/sbin/networksetup", "-listallhardwareports"],
    "system_profiler-SPThunderboltDataType.json": [
        "/usr/sbin/system_profiler",
        "SPThunderboltDataType",
        "-json",
    ],
    "system_profiler-SPDisplaysDataType.json": [
        "/usr/sbin/system_profiler",
        "SPDisplaysDataType",
        "-json",
    ],
    "vm_stat.txt": ["/usr/bin/vm_stat"],
    "ibv_devices.txt": ["ibv_devices"],  # on PATH from macOS 26.2; missing means no RDMA
}
OPTIONAL_COMMANDS = {"ibv_devices.txt"}


def capture_name(argv: list[str]) -> str:
    """The capture file name of a command collect_macos runs."""
    for name, known in MACOS_COMMANDS.items():
        if known == argv:
            return name
    raise KeyError(f"not a host-facts command: {argv}")


def replay_runner(folder: Path) -> Runner:
    """A Runner answering each command from its file in a capture folder, as on that Mac; a
    file that is missing fails as the command would."""

    def run(argv: list[str]) -> str:
        path = Path(folder) / capture_name(argv)
        try:
            return path.read_text()
        except OSError:
            raise HostFactsError(f"{argv[0]}: no {path.name} in {folder}") from None

    return run


def capturing_runner(run: Runner, folder: Path) -> Runner:
    """A Runner that also keeps each command's output under its capture name in folder."""

    def capture(argv: list[str]) -> str:
        text = run(argv)
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / capture_name(argv)).write_text(text)
        return text

    return capture


def metal_working_set() -> int:
    """Metal's recommended working set in bytes, as MLX reports it; 0 without Metal."""
    try:
        import mlx.core as mx

        return int(mx.device_info().get("max_recommended_working_set_size", 0))
    except (ImportError, AttributeError, RuntimeError):
        return 0


def _optional(run: Runner, argv: list[str]) -> str:
    try:
        return run(argv)
    except HostFactsError:
        return ""


def collect_macos(
    run: Runner = run_command,
    node_id_path: Path = DEFAULT_NODE_ID_PATH,
    working_set: Callable[[], int] = metal_working_set,
) -> HostFacts:
    cmd = MACOS_COMMANDS
    sysctl = parse_sysctl(run(cmd["sysctl.txt"]))
    ifconfig = run(cmd["ifconfig.txt"])
    addresses = parse_ifconfig(ifconfig)
    buses = parse_thunderbolt(run(cmd["system_profiler-SPThunderboltDataType.json"]))
    hardware_ports = parse_hardware_ports(run(cmd["networksetup-listallhardwareports.txt"]))
    displays = run(cmd["system_profiler-SPDisplaysDataType.json"])
    wired = sysctl.get("iogpu.wired_limit_mb", "0")
    return HostFacts(
        node_id=load_node_id(node_id_path),
        hostname=sysctl.get("kern.hostname") or socket.gethostname(),
        chip=sysctl.get("machdep.cpu.brand_string", ""),
        memory_total=int(sysctl["hw.memsize"]),
        memory_available=parse_vm_stat(run(cmd["vm_stat.txt"]), int(sysctl["hw.pagesize"])),
        gpu_cores=parse_gpu_cores(displays),
        os=f"macOS {sysctl.get('kern.osproductversion', '')}".strip(),
        thunderbolt=thunderbolt_ports(buses, hardware_ports, addresses),
        addresses=addresses,
        bridges=parse_bridge_members(ifconfig),
        rdma_devices=parse_ibv_devices(_optional(run, cmd["ibv_devices.txt"])),
        wired_limit_mb=int(wired) if wired.isdigit() else 0,
        gpu_working_set=working_set(),
        lan=lan_devices(hardware_ports),
    )


def fake_thunderbolt(path: str, addresses: Mapping[str, list[str]]) -> list[ThunderboltPort]:
    """Ports from a JSON list of ThunderboltPort dicts, for tests in Linux network namespaces.

    A port without an ip takes the first address of its interface, so a test can name veth
    interfaces and let `ip -j addr` supply what was configured on them.
    """
    try:
        ports = [ThunderboltPort.from_dict(d) for d in json.loads(Path(path).read_text())]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HostFactsError(f"{FAKE_THUNDERBOLT_ENV}={path} is not a list of ports: {e}") from e
    for p in ports:
        if p.ip is None:
            p.ip = first_ip(addresses, p.interface)
    return ports


def collect_linux(
    run: Runner = run_command,
    read: Reader = read_text,
    node_id_path: Path = DEFAULT_NODE_ID_PATH,
    env: Mapping[str, str] = os.environ,
) -> HostFacts:
    total, available = parse_meminfo(read("/proc/meminfo"))
    addresses = parse_ip_addr_json(run(["ip", "-j", "addr"]))
    fake = env.get(FAKE_THUNDERBOLT_ENV)
    return HostFacts(
        node_id=load_node_id(node_id_path),
        hostname=socket.gethostname(),
        chip=parse_cpu_model(read("/proc/cpuinfo")),
        memory_total=total,
        memory_available=available,
        gpu_cores=0,
        os=f"Linux {platform.release()}",
        thunderbolt=fake_thunderbolt(fake, addresses) if fake else [],
        addresses=addresses,
    )


def replayed_here(folder: Path, node_id_path: Path, addresses: dict[str, list[str]]) -> HostFacts:
    """A capture folder's Mac on this machine's own addresses, so an agent can listen: a
    stand-in Mac for tests in network namespaces."""
    facts = collect_macos(replay_runner(folder), node_id_path, working_set=lambda: 0)
    facts.addresses, facts.bridges = addresses, {}
    for port in facts.thunderbolt:
        port.ip = first_ip(addresses, port.interface)
    return facts


def collect(node_id_path: Path = DEFAULT_NODE_ID_PATH) -> HostFacts:
    """Facts about this machine, by platform; with MLXDIST_FACTS_FROM=DIR, the Mac captured in
    DIR on this machine's addresses."""
    folder = os.environ.get(FACTS_FROM_ENV)
    if folder:
        here = collect_macos if sys.platform == "darwin" else collect_linux
        return replayed_here(Path(folder), node_id_path, here(node_id_path=node_id_path).addresses)
    if sys.platform == "darwin":
        return collect_macos(node_id_path=node_id_path)
    if sys.platform.startswith("linux"):
        return collect_linux(node_id_path=node_id_path)
    raise HostFactsError(f"unsupported platform {sys.platform}")
