"""hosts.toml: a cluster written down by hand (see hosts.example.toml for every field)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from quantize.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

# auto: jaccl on a mesh of RDMA cables, else jaccl-ring on a ring of them, else ring
BACKENDS = ("ring", "jaccl", "jaccl-ring", "auto")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class HostsError(UserError, ValueError):
    """A hosts file that cannot be used; the message names the field."""


@dataclass(frozen=True)
class HostEntry:
    name: str
    address: str
    ssh: str | None = None
    memory_gb: float | None = None
    rank: int | None = None
    agent_port: int | None = None


@dataclass(frozen=True)
class HostsFile:
    backend: str
    hosts: list[HostEntry]


def _entry(i: int, raw: dict) -> HostEntry:
    where = f"hosts[{i}]"
    unknown = set(raw) - {"name", "address", "ssh", "memory_gb", "rank", "agent_port"}
    if unknown:
        raise HostsError(f"{where} has unknown fields: {', '.join(sorted(unknown))}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise HostsError(f"{where}.name must be letters, digits, '.', '_' or '-'")
    address = raw.get("address")
    try:
        ipaddress.ip_address(address)
    except (ValueError, TypeError):
        raise HostsError(f"{where} ({name}): address must be an IP address") from None
    memory = raw.get("memory_gb")
    if memory is not None and (not isinstance(memory, (int, float)) or memory <= 0):
        raise HostsError(f"{where} ({name}): memory_gb must be a positive number")
    rank = raw.get("rank")
    if rank is not None and (not isinstance(rank, int) or rank < 0):
        raise HostsError(f"{where} ({name}): rank must be a whole number from 0")
    port = raw.get("agent_port")
    if port is not None and (not isinstance(port, int) or not 0 < port < 65536):
        raise HostsError(f"{where} ({name}): agent_port must be a port number")
    ssh = raw.get("ssh")
    if ssh is not None and (not isinstance(ssh, str) or ssh.startswith("-")):
        raise HostsError(f"{where} ({name}): ssh must be a destination such as me@host")
    return HostEntry(name, address, ssh, memory, rank, port)


def parse_hosts(text: str) -> HostsFile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise HostsError(f"not valid TOML ({e})") from None
    backend = data.get("backend", "auto")
    if backend not in BACKENDS:
        raise HostsError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    raw = data.get("hosts")
    if not isinstance(raw, list) or not raw:
        raise HostsError("no [[hosts]] tables")
    hosts = [_entry(i, h) for i, h in enumerate(raw)]
    names = [h.name for h in hosts]
    if len(set(names)) != len(names):
        raise HostsError("host names must differ")
    ranks = [h.rank for h in hosts if h.rank is not None]
    if len(set(ranks)) != len(ranks):
        raise HostsError("two hosts have the same rank")
    # Hosts with a rank take it; the others follow in file order.
    ordered = sorted(enumerate(hosts), key=lambda ih: (ih[1].rank is None, ih[1].rank or 0, ih[0]))
    return HostsFile(backend, [h for _, h in ordered])


def read_hosts(path: str | Path) -> HostsFile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise HostsError(f"cannot read {path}: {e.strerror}") from None
    try:
        return parse_hosts(text)
    except HostsError as e:
        raise HostsError(f"{path}: {e}") from None
