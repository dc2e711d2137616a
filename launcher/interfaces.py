"""Which of a host's addresses the agent listens on and the launcher browses from: only the
interfaces the user names (on a Mac, the Thunderbolt Bridge by default), never every one."""

from __future__ import annotations

import sys

from launcher.hostfacts import HostFacts
from quantize.errors import UserError


class InterfaceError(UserError):
    """No usable address on the interfaces asked for; the message says what to give."""


def _ip(address: str) -> str:
    return address.split("/")[0]


def listen_addresses(facts: HostFacts, interfaces: list[str]) -> list[str]:
    """The IPs of the chosen interfaces: the Thunderbolt bridge by default on macOS, and never
    every interface without being asked."""
    if not interfaces:
        if sys.platform == "darwin" and facts.addresses.get("bridge0"):
            interfaces = ["bridge0"]
        elif sys.platform == "darwin":
            interfaces = [p.interface for p in facts.thunderbolt if p.ip]
        if not interfaces:
            raise InterfaceError(
                "give --interface: the agent listens only on interfaces you name "
                "(on a Mac, the Thunderbolt Bridge, bridge0, by default)"
            )
    addresses = []
    for name in interfaces:
        ips = [_ip(a) for a in facts.addresses.get(name, []) if ":" not in a]
        if not ips:
            known = ", ".join(sorted(facts.addresses)) or "none"
            raise InterfaceError(f"interface {name} has no IPv4 address (interfaces: {known})")
        addresses += ips
    return addresses
