"""`mlxdist doctor`: is one Mac ready to be a node, and what to fix. Pure checks over readings.

A reading is a command's raw output under its capture file name (launcher.hostfacts.
MACOS_COMMANDS), or None when the command failed or the capture lacks it, plus what only a live
machine can tell (MLX, the secret file's mode, the agents' answers). Each check gives one Row;
a missing reading gives a `missing` row, never an exception.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from launcher.chips import chip
from launcher.gpumem import (
    ESTIMATE,
    METAL,
    WIRED,
    gpu_limit,
    sysctl_command,
    wired_limit_mb_to_fit,
)
from launcher.hostfacts import (
    HostFactsError,
    parse_bridge_members,
    parse_gpu_cores,
    parse_hardware_ports,
    parse_ibv_devices,
    parse_sysctl,
    parse_thunderbolt,
    parse_vm_stat,
)
from launcher.planner import DEFAULT_HEADROOM
from launcher.topology import DISABLE_BRIDGE

OK, WARN, FAIL, MISSING = "ok", "warn", "fail", "missing"
SIGNING_WINDOW = 30.0  # seconds: launcher.auth.Verifier's default, which every agent uses
RDMA_MACOS = (26, 2)  # Thunderbolt RDMA (MLX's JACCL backend) arrived in macOS 26.2
MIN_MLX = (0, 32)  # as pyproject.toml requires
GB = 10**9
MiB = 2**20
SET_CLOCK = "sudo sntp -sS time.apple.com"

SYSCTL = "sysctl.txt"
IFCONFIG = "ifconfig.txt"
PORTS = "networksetup-listallhardwareports.txt"
THUNDERBOLT = "system_profiler-SPThunderboltDataType.json"
DISPLAYS = "system_profiler-SPDisplaysDataType.json"
VM_STAT = "vm_stat.txt"
IBV = "ibv_devices.txt"


@dataclass(frozen=True)
class Row:
    check: str
    status: str  # ok | warn | fail | missing
    message: str


@dataclass(frozen=True)
class MlxReading:
    version: str | None  # None: MLX is not installed
    metal: bool
    working_set: int = 0  # Metal's recommended working set in bytes; 0 when unknown


@dataclass(frozen=True)
class SecretReading:
    path: str
    mode: int | None  # permission bits; None when there is no file


@dataclass(frozen=True)
class AgentReading:
    """One signed GET /health: the local clock around it and what came back."""

    name: str
    url: str
    sent: float
    received: float
    status: int | None  # HTTP status; None when the agent could not be reached
    error: str = ""
    agent_time: float | None = None  # /health's `time`
    date: float | None = None  # the answer's Date header (whole seconds), on refusals too
    this_node: bool = False

    def skew(self) -> float | None:
        """The agent's clock minus this machine's, in seconds, if the answer tells it."""
        told = self.agent_time if self.agent_time is not None else self.date
        return None if told is None else told - (self.sent + self.received) / 2


@dataclass
class Readings:
    files: Mapping[str, str | None]
    missing_reason: str = "not in the capture"
    mlx: MlxReading | None = None
    on_mac: bool = True
    secret: SecretReading | None = None
    agents: list[AgentReading] | None = None  # None: no agent was asked
    cluster: str | None = None
    need_bytes: int | None = None  # what a plan puts on this Mac
    window: float = SIGNING_WINDOW
    notes: dict[str, str] = field(default_factory=dict)  # check -> why it was not run


class _Missing(Exception):
    def __init__(self, row: Row):
        self.row = row


def _text(r: Readings, check: str, name: str) -> str:
    text = r.files.get(name)
    if text is None:
        raise _Missing(Row(check, MISSING, f"no {name}: {r.missing_reason}"))
    return text


def _parsed(check: str, name: str, parse: Callable, text: str):
    try:
        return parse(text)
    except (HostFactsError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise _Missing(Row(check, MISSING, f"{name} could not be read: {e}")) from None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", str(text))[:3])


def _sysctl(r: Readings, check: str) -> dict[str, str]:
    return _parsed(check, SYSCTL, parse_sysctl, _text(r, check, SYSCTL))


def _sysctl_value(r: Readings, key: str) -> str:
    """One sysctl value for a check that can do without it: "" when unknown."""
    text = r.files.get(SYSCTL)
    return parse_sysctl(text).get(key, "") if text is not None else ""


@dataclass(frozen=True)
class _Port:
    interface: str | None  # None when the capture has no networksetup output to name it
    receptacle: str
    speed: str
    peers: int

    @property
    def label(self) -> str:
        return self.interface or f"receptacle {self.receptacle}"


def _ports(r: Readings, check: str, need_interfaces: bool = True) -> list[_Port]:
    """Thunderbolt receptacles with their link speed and peers, and their network interface.
    Without networksetup's output (need_interfaces=False) every receptacle is kept, unnamed."""
    buses = _parsed(check, THUNDERBOLT, parse_thunderbolt, _text(r, check, THUNDERBOLT))
    devices = None
    if need_interfaces or r.files.get(PORTS) is not None:
        devices = _parsed(check, PORTS, parse_hardware_ports, _text(r, check, PORTS))
    ports = []
    for bus in sorted(buses, key=lambda b: str(b["receptacle"]).zfill(4)):
        iface = devices.get(f"Thunderbolt {bus['receptacle']}") if devices is not None else None
        if iface or devices is None:
            ports.append(_Port(iface, str(bus["receptacle"]), bus["speed"], len(bus["peer_uuids"])))
    return ports


def link_gbps(speed: str) -> int | None:
    """A bus's current link speed in Gb/s ("80 Gb/s"); None for a capacity ("Up to 120 Gb/s")."""
    m = re.fullmatch(r"\s*(\d+)\s*Gb/s\s*", speed)
    return int(m.group(1)) if m else None


def generation(gbps: int) -> int:
    """Thunderbolt 5 links at 80 Gb/s (120 with boost), Thunderbolt 4 at 40."""
    return 5 if gbps >= 80 else 4 if gbps >= 40 else 3


def _tb_of_chip(brand: str) -> int | None:
    try:
        return chip(brand.removeprefix("Apple ").strip()).thunderbolt
    except ValueError:
        return None


def _gb(n: float) -> str:
    return f"{n / GB:.0f} GB"


# ---- the checks ----


def check_macos(r: Readings) -> Row:
    version = _sysctl(r, "macOS").get("kern.osproductversion", "")
    if not version:
        return Row("macOS", MISSING, "sysctl.txt has no kern.osproductversion")
    if _version(version) < RDMA_MACOS:
        return Row(
            "macOS",
            WARN,
            f"macOS {version}: the ring backend works; RDMA over Thunderbolt (jaccl) needs macOS "
            "26.2 or later: update in System Settings > General > Software Update",
        )
    return Row("macOS", OK, f"macOS {version} (RDMA over Thunderbolt possible)")


def check_chip(r: Readings) -> Row:
    brand = _sysctl(r, "chip").get("machdep.cpu.brand_string", "")
    if not brand:
        return Row("chip", MISSING, "sysctl.txt has no machdep.cpu.brand_string")
    cores = r.files.get(DISPLAYS)
    gpu = ""
    if cores is not None:
        gpu = f", {_parsed('chip', DISPLAYS, parse_gpu_cores, cores)} GPU cores"
    tb = _tb_of_chip(brand)
    if tb is None:  # the performance model then assumes a chip from the memory
        return Row(
            "chip",
            WARN,
            f"{brand}{gpu}: not in mlxdist's chip table (launcher/chips.py), so plans predict "
            "its speed from a chip of its memory size; report it with a --capture",
        )
    return Row("chip", OK, f"{brand}{gpu}, Thunderbolt {tb}")


def check_mlx(r: Readings) -> Row:
    if r.mlx is None:
        return Row("MLX", MISSING, "not known: the capture has no mlx.json")
    if r.mlx.version is None:
        return Row("MLX", FAIL, "MLX is not installed: pip install mlxdist (it brings MLX)")
    if _version(r.mlx.version) < MIN_MLX:
        need = ".".join(map(str, MIN_MLX))
        return Row("MLX", FAIL, f"MLX {r.mlx.version} is older than {need}: pip install -U mlx")
    return Row("MLX", OK, f"MLX {r.mlx.version}")


def check_metal(r: Readings) -> Row:
    if r.mlx is None:
        return Row("Metal", MISSING, "not known: the capture has no mlx.json")
    if r.mlx.metal:
        return Row("Metal", OK, "MLX runs on the Metal GPU")
    if not r.on_mac:
        return Row("Metal", MISSING, "not a Mac: MLX runs on the CPU here")
    return Row(
        "Metal",
        FAIL,
        "MLX sees no Metal GPU: install mlx (not mlx[cpu]) in a native arm64 Python, not Rosetta",
    )


def check_memory(r: Readings) -> Row:
    s = _sysctl(r, "memory")
    if not s.get("hw.memsize", "").isdigit():
        return Row("memory", MISSING, "sysctl.txt has no hw.memsize")
    total = int(s["hw.memsize"])
    wired_text = s.get("iogpu.wired_limit_mb", "0")  # absent before macOS 14: Metal's own limit
    wired_mb = int(wired_text) if wired_text.isdigit() else 0
    limit, source = gpu_limit(total, wired_mb, r.mlx.working_set if r.mlx else 0)
    how = {
        WIRED: f"iogpu.wired_limit_mb={wired_mb}",
        METAL: "Metal's working set",
        ESTIMATE: "estimated: Metal's own figure is unknown",
    }[source]
    free = ""
    if (vm := r.files.get(VM_STAT)) is not None:
        page = int(s["hw.pagesize"]) if s.get("hw.pagesize", "").isdigit() else None
        free = f", {_gb(_parsed('memory', VM_STAT, lambda t: parse_vm_stat(t, page), vm))} free"
    facts = f"{_gb(total)} RAM, the GPU can wire {_gb(limit)} ({how}){free}"
    headroom = int(total * DEFAULT_HEADROOM)  # what plans leave macOS
    most = wired_limit_mb_to_fit(total, headroom)
    if wired_mb > most:
        return Row(
            "memory",
            WARN,
            f"{facts}: the wired limit leaves macOS less than the {DEFAULT_HEADROOM:.0%} plans "
            f"keep; lower it: {sysctl_command(most)}",
        )
    if r.need_bytes is None:
        return Row("memory", OK, facts)
    need = r.need_bytes
    if need <= limit:
        return Row("memory", OK, f"{facts}; the plan's {_gb(need)} fits")
    if need > most * MiB:
        return Row(
            "memory",
            FAIL,
            f"the plan puts {_gb(need)} on this Mac, more than it can give the GPU ({facts}): "
            "plan across more Macs or a smaller quantisation",
        )
    return Row(
        "memory",
        FAIL,
        f"the plan puts {_gb(need)} on this Mac but the GPU can wire only {_gb(limit)} "
        f"({how}): {sysctl_command(most)} (until the next restart)",
    )


def check_thunderbolt(r: Readings) -> Row:
    ports = _ports(r, "Thunderbolt", need_interfaces=False)
    unnamed = r.files.get(PORTS) is None
    if not ports:
        return Row("Thunderbolt", WARN, "no Thunderbolt port has a network interface")
    cabled = [p for p in ports if p.peers]
    if not cabled:
        return Row(
            "Thunderbolt",
            WARN,
            f"{len(ports)} ports, none cabled to another Mac: cable the Macs in a ring",
        )
    links = []
    slow = []
    for p in cabled:
        gbps = link_gbps(p.speed)
        if gbps is None:
            links.append(f"{p.label} ({p.speed or 'speed unknown'})")
            continue
        links.append(f"{p.label} {gbps} Gb/s TB{generation(gbps)}")
        if generation(gbps) < 5:
            slow.append(p.label)
    facts = f"{len(ports)} ports, {len(cabled)} cabled to another Mac: {', '.join(links)}"
    if unnamed:
        facts += f" (no {PORTS}: interfaces not named)"
    brand = _sysctl_value(r, "machdep.cpu.brand_string")
    own = _tb_of_chip(brand) if brand else None
    if slow and own == 5:
        return Row(
            "Thunderbolt",
            WARN,
            f"{facts}; {', '.join(slow)} link at Thunderbolt 4 speed: the peer or the cable is "
            "TB4, and RDMA (jaccl) needs Thunderbolt 5 at both ends: use a TB5 cable and Mac",
        )
    if slow and own == 4:
        return Row("Thunderbolt", OK, f"{facts} (a Thunderbolt 4 Mac: the ring backend over TCP)")
    return Row("Thunderbolt", OK, facts)


def _bridge_up(ifconfig: str, bridge: str) -> bool:
    m = re.search(rf"^{re.escape(bridge)}: flags=\w+<([^>]*)>", ifconfig, re.M)
    return bool(m) and "UP" in m.group(1).split(",")


def check_bridge(r: Readings) -> Row:
    ifconfig = _text(r, "bridge", IFCONFIG)
    bridges = _parsed("bridge", IFCONFIG, parse_bridge_members, ifconfig)
    if r.files.get(PORTS) is not None:
        devices = _parsed("bridge", PORTS, parse_hardware_ports, r.files[PORTS])
        tb = {dev for name, dev in devices.items() if re.fullmatch(r"Thunderbolt \d+", name)}
        bridged = {b: [m for m in ms if m in tb] for b, ms in sorted(bridges.items())}
    else:
        # Without networksetup's names, a bridge's members are taken to be Thunderbolt ports,
        # as in the Thunderbolt Bridge macOS sets up.
        bridged = dict(sorted(bridges.items()))
    bridged = {b: ms for b, ms in bridged.items() if ms}
    cabled: set[str] = set()  # unknown without both captures: no loop can be told then
    try:
        cabled = {p.interface for p in _ports(r, "bridge") if p.peers}
    except _Missing:
        pass
    if not bridged:
        return Row("bridge", OK, "no Thunderbolt port is in a bridge")
    for bridge, members in bridged.items():
        loop = [m for m in members if m in cabled]
        if _bridge_up(ifconfig, bridge) and len(loop) >= 2:
            return Row(
                "bridge",
                FAIL,
                f"{bridge} is up and bridges {', '.join(loop)}, each cabled to a Mac: over a loop "
                f"of 3+ Macs the bridge storms; disable the Thunderbolt Bridge: {DISABLE_BRIDGE}",
            )
    for bridge, members in bridged.items():
        loop = [m for m in members if m in cabled]
        if loop:
            return Row(
                "bridge",
                WARN,
                f"{', '.join(loop)} is cabled to a Mac but sits in {bridge}, so it has no ring "
                f"address of its own: {DISABLE_BRIDGE}",
            )
    bridge, members = next(iter(bridged.items()))
    state = "up" if _bridge_up(ifconfig, bridge) else "down"
    return Row(
        "bridge",
        WARN,
        f"{bridge} ({state}) still holds {', '.join(members)}: macOS puts cabled ports back in it; "
        f"disable the Thunderbolt Bridge service: {DISABLE_BRIDGE}",
    )


def check_rdma(r: Readings) -> Row:
    text = r.files.get(IBV)
    version = _sysctl_value(r, "kern.osproductversion")
    if text is None:
        if version and _version(version) < RDMA_MACOS:
            return Row(
                "RDMA",
                WARN,
                f"macOS {version} has no RDMA over Thunderbolt: update to 26.2 or later, then run "
                "`rdma_ctl enable` in recovery mode",
            )
        return Row("RDMA", MISSING, f"no {IBV}: {r.missing_reason}")
    devices = parse_ibv_devices(text)
    listed = ", ".join(devices) or "none"
    if r.files.get(THUNDERBOLT) is None or r.files.get(PORTS) is None:
        return Row("RDMA", OK, f"devices: {listed} (no Thunderbolt capture to match with cables)")
    cabled = [p.interface for p in _ports(r, "RDMA") if p.peers]
    if not cabled:
        return Row("RDMA", OK, f"devices: {listed}; no port is cabled")
    lacking = [i for i in cabled if f"rdma_{i}" not in devices]
    if lacking:
        names = ", ".join(f"rdma_{i}" for i in lacking)
        return Row(
            "RDMA",
            WARN,
            f"{', '.join(lacking)} cabled to a Mac but no {names}: RDMA is off; start in recovery "
            "mode (hold the power button), open Terminal, run `rdma_ctl enable`, restart",
        )
    return Row("RDMA", OK, f"{', '.join(f'rdma_{i}' for i in cabled)} ready for jaccl")


def check_secret(r: Readings) -> Row:
    s = r.secret
    if s is None:
        return Row("secret", MISSING, r.notes.get("secret", "not checked"))
    if s.mode is None:
        return Row(
            "secret",
            FAIL,
            f"no secret at {s.path}: run mlxdist init on one Mac and copy the file to the others",
        )
    if s.mode & 0o077:
        return Row(
            "secret",
            FAIL,
            f"{s.path} has mode {s.mode & 0o777:04o}, readable by others: chmod 600 {s.path}",
        )
    return Row("secret", OK, f"{s.path} (mode {s.mode & 0o777:04o})")


def _agent_row(a: AgentReading, window: float) -> Row:
    check = "agent (this Mac)" if a.this_node else f"agent {a.name}"
    if a.status is None:
        return Row(
            check,
            FAIL,
            f"cannot reach {a.url} ({a.error}): start `mlxdist agent` there and check --interface",
        )
    if a.status == 401 and a.error == "stale":
        return Row(
            check,
            FAIL,
            f"{a.url} refuses our requests as stale: the clocks differ by more than {window:.0f} s",
        )
    if a.status == 401:
        return Row(
            check,
            FAIL,
            f"{a.url} refuses our signature ({a.error}): it holds another secret; copy the "
            "cluster's secret file to both",
        )
    if a.status >= 400:
        return Row(check, FAIL, f"{a.url} answered HTTP {a.status}: {a.error}")
    return Row(check, OK, f"{a.url} answers signed requests")


def check_agents(r: Readings) -> list[Row]:
    if r.agents is None:
        return [Row("agent", MISSING, r.notes.get("agent", "not checked"))]
    if not r.agents:
        return [
            Row(
                "agent",
                FAIL,
                f"no agent of cluster {r.cluster!r} found: start `mlxdist agent --cluster "
                f"{r.cluster}` on each Mac, on an interface this one shares",
            )
        ]
    rows = [_agent_row(a, r.window) for a in r.agents]
    if r.notes.get("own agent"):
        rows.append(Row("agent (this Mac)", FAIL, r.notes["own agent"]))
    return rows


def check_clock(skews: Mapping[str, float], window: float = SIGNING_WINDOW) -> Row:
    """skews: agent name -> its clock minus this one's, seconds."""
    if not skews:
        return Row("clock", MISSING, "no agent told its time")
    name = max(skews, key=lambda n: abs(skews[n]))
    skew = skews[name]
    way = "behind" if skew > 0 else "ahead of"
    told = f"this clock is {abs(skew):.1f} s {way} {name}'s"
    fix = f"turn on network time on both (on a Mac: {SET_CLOCK})"
    if abs(skew) > window:
        return Row("clock", FAIL, f"{told}, past the {window:.0f} s signing window: {fix}")
    if abs(skew) > window / 2:
        return Row("clock", WARN, f"{told}, near the {window:.0f} s signing window: {fix}")
    others = f"{len(skews)} agent" + ("s" if len(skews) > 1 else "")
    return Row("clock", OK, f"within {abs(skew):.1f} s of {others} (window {window:.0f} s)")


def check_agent_clocks(r: Readings) -> Row:
    if r.agents is None:
        return Row("clock", MISSING, r.notes.get("agent", "not checked"))
    skews = {}
    for a in r.agents:
        skew = a.skew()
        if skew is not None:
            skews[a.name] = skew
    return check_clock(skews, r.window)


HOST_CHECKS: list[Callable[[Readings], Row]] = [
    check_macos,
    check_chip,
    check_mlx,
    check_metal,
    check_memory,
    check_thunderbolt,
    check_bridge,
    check_rdma,
    check_secret,
]


def run_checks(r: Readings) -> list[Row]:
    """Every check's row, in a fixed order; a missing or unreadable reading never raises."""
    rows = []
    for check in HOST_CHECKS:
        try:
            rows.append(check(r))
        except _Missing as m:
            rows.append(m.row)
    rows += check_agents(r)
    rows.append(check_agent_clocks(r))
    return rows


def check_advertisement(txt: Mapping[str, str] | None, error: str = "", status=FAIL) -> Row:
    """Whether the TXT record fits zeroconf: each key=value within 255 bytes. Without a record,
    error says why: a refusal of txt_record (fail) or facts that could not be read (missing)."""
    if txt is None:
        return Row("advertisement", status, error)
    sizes = {k: len(f"{k}={v}".encode()) for k, v in txt.items()}
    over = [k for k, n in sizes.items() if n > 255]
    if over:
        return Row(
            "advertisement",
            FAIL,
            f"TXT entries over 255 bytes: {', '.join(over)}: zeroconf cannot carry them",
        )
    total = sum(n + 1 for n in sizes.values())
    largest = max(sizes, key=sizes.get)
    return Row(
        "advertisement",
        OK,
        f"fits: {len(txt)} entries, {total} bytes, the largest {largest} ({sizes[largest]} bytes)",
    )


def failed(rows: list[Row]) -> bool:
    return any(row.status == FAIL for row in rows)
