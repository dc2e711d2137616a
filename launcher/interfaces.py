"""Which of a host's addresses the agent listens on and the launcher browses from: the
interfaces the user names, else one the ring setup never takes away, never every one.

The control plane (zeroconf and the agents' signed API) belongs on the LAN when there is one,
else on the cables' own addresses. bridge0, the Thunderbolt Bridge, is the last resort: the
printed ring setup takes the cabled ports out of it, which cuts off whatever listens there
(docs/network.md).
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Callable

from launcher.hostfacts import HostFacts
from quantize.errors import UserError

BRIDGE_WARNING = (
    "warning: listening on bridge0, the Thunderbolt Bridge: the ring setup takes the cabled "
    "ports out of it and cuts this off; give --interface with a LAN interface or a cable's "
    "port (docs/network.md)"
)


class InterfaceError(UserError):
    """No usable address on the interfaces asked for; the message says what to give."""


def _ip(address: str) -> str:
    return address.split("/")[0]


def _ipv4(facts: HostFacts, name: str) -> list[str]:
    return [_ip(a) for a in facts.addresses.get(name, []) if ":" not in a]


def _routable(ip: str) -> bool:
    """Neither link-local (169.254/16, which every bridged or cabled port self-assigns) nor
    loopback nor unspecified."""
    a = ipaddress.ip_address(ip)
    return not (a.is_link_local or a.is_loopback or a.is_unspecified)


def default_interfaces(facts: HostFacts) -> tuple[list[str], str | None]:
    """(interfaces, warning): the first LAN interface with a routable IPv4 that is neither a
    Thunderbolt port nor a bridge; else every Thunderbolt port with a routable IPv4 (its /30);
    else bridge0, with a warning. ([], None) when there is none of these. Link-local addresses
    count only on bridge0."""
    ports = {p.interface for p in facts.thunderbolt}
    for name in facts.lan:
        if name in ports or name.startswith("bridge"):
            continue
        if any(_routable(ip) for ip in _ipv4(facts, name)):
            return [name], None
    # A cable's own address is one the setup gave it; a self-assigned 169.254 one is replaced
    # when the setup runs (ifconfig inet without alias), which would cut the agent off.
    cables = [
        p.interface
        for p in facts.thunderbolt
        if any(_routable(ip) for ip in _ipv4(facts, p.interface))
    ]
    if cables:
        return cables, None
    if _ipv4(facts, "bridge0"):
        return ["bridge0"], BRIDGE_WARNING
    return [], None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def listen_addresses(
    facts: HostFacts, interfaces: list[str], warn: Callable[[str], None] = _stderr
) -> list[str]:
    """The IPv4 addresses of the named interfaces, or of default_interfaces' choice (its
    warning, if any, goes to warn)."""
    if not interfaces:
        interfaces, warning = default_interfaces(facts)
        if warning:
            warn(warning)
        if not interfaces:
            raise InterfaceError(
                "give --interface: no LAN interface (Ethernet, Wi-Fi) with a routable IPv4, no "
                "Thunderbolt port with an address and no bridge0 here, and the agent listens "
                "only on interfaces you name"
            )
    addresses = []
    for name in interfaces:
        ips = _ipv4(facts, name)
        if not ips:
            known = ", ".join(sorted(facts.addresses)) or "none"
            raise InterfaceError(f"interface {name} has no IPv4 address (interfaces: {known})")
        addresses += ips
    return addresses
