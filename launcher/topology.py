"""Thunderbolt topology: which ports are cabled, a ring through all hosts, and its addresses.

MLX's ring backend connects rank r to rank r+1 only (ring.cpp: rank r accepts on its own
hostfile entry and connects to entry r+1), so neighbouring ranks must share a cable. Each cable
needs a subnet of its own: two Thunderbolt ports of one Mac on one subnet (the 169.254/16 that
macOS self-assigns, say) leave the kernel free to send a peer's packets out of the wrong port.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import combinations

from .hostfacts import ThunderboltPort

Addresses = Mapping[str, Mapping[str, list[str]]]  # host -> iface -> ["a.b.c.d/prefix", ...]
NETMASK_30 = "255.255.255.252"
# Off, macOS no longer puts the ports back in bridge0; left on over a loop of 3+ Macs, the
# bridge forwards broadcasts round the loop (a storm).
DISABLE_BRIDGE = 'sudo networksetup -setnetworkserviceenabled "Thunderbolt Bridge" off'


@dataclass(frozen=True, order=True)
class Link:
    """One cable from a_host's port a_iface to b_host's port b_iface; the a end sorts first."""

    a_host: str
    a_iface: str
    b_host: str
    b_iface: str

    def joins(self, x: str, y: str) -> bool:
        return {self.a_host, self.b_host} == {x, y}

    def iface(self, host: str) -> str:
        return self.a_iface if host == self.a_host else self.b_iface

    def other(self, host: str) -> str:
        return self.b_host if host == self.a_host else self.a_host

    def __str__(self) -> str:
        return f"{self.a_host}:{self.a_iface} <-> {self.b_host}:{self.b_iface}"


@dataclass
class RingAddresses:
    # ips[r]: where rank r listens, its own end of the cable(s) from rank r-1; every rank lists
    # the same number because the ring backend wants as many sockets left as right.
    ips: list[list[str]]
    missing: list[Link]  # ring cables whose ends lack a subnet of their own

    @property
    def ok(self) -> bool:
        """True when every rank has an address (a single rank needs none)."""
        return len(self.ips) <= 1 or all(self.ips)


def cable_graph(hosts: Mapping[str, list[ThunderboltPort]]) -> list[Link]:
    """Cables between hosts: a port that lists another host's port domain as a peer (either way)."""
    owner: dict[str, tuple[str, str]] = {}
    for host in sorted(hosts):
        for port in hosts[host]:
            owner.setdefault(port.domain_uuid, (host, port.interface))
    ends = set()
    for host in sorted(hosts):
        for port in hosts[host]:
            for peer in port.peer_uuids:
                # A cable looped back into the same Mac is no use to a ring.
                if peer in owner and owner[peer][0] != host:
                    ends.add(tuple(sorted([(host, port.interface), owner[peer]])))
    return [Link(a[0], a[1], b[0], b[1]) for a, b in sorted(ends)]


def _adjacency(names: Iterable[str], links: Iterable[Link]) -> dict[str, set[str]]:
    adj: dict[str, set[str]] = {n: set() for n in names}
    for link in links:
        if link.a_host in adj and link.b_host in adj:
            adj[link.a_host].add(link.b_host)
            adj[link.b_host].add(link.a_host)
    return adj


def ring_order(hosts: Iterable[str], links: Iterable[Link]) -> list[str] | None:
    """Hosts in an order where each one is cabled to the next (and the last to the first).

    Deterministic: starts at the sorted-first host and tries neighbours in sorted order.
    Two hosts need one cable; one host needs none. None when no such order exists.
    """
    names = sorted(set(hosts))
    if len(names) <= 1:
        return names or None
    adj = _adjacency(names, links)
    path = [names[0]]

    def extend() -> bool:
        if len(path) == len(names):
            return path[0] in adj[path[-1]]
        for nxt in sorted(adj[path[-1]]):
            if nxt not in path:
                path.append(nxt)
                if extend():
                    return True
                path.pop()
        return False

    return path if extend() else None


def _components(names: list[str], adj: Mapping[str, set[str]]) -> list[list[str]]:
    left, groups = set(names), []
    for start in names:
        if start not in left:
            continue
        group, todo = [], [start]
        left.discard(start)
        while todo:
            h = todo.pop()
            group.append(h)
            for n in adj[h] & left:
                left.discard(n)
                todo.append(n)
        groups.append(sorted(group))
    return groups


def _one_cable_fix(names: list[str], links: list[Link]) -> tuple[str, str] | None:
    adj = _adjacency(names, links)
    for x, y in combinations(names, 2):
        if y not in adj[x] and ring_order(names, [*links, Link(x, "", y, "")]):
            return x, y
    return None


def explain_no_ring(hosts: Iterable[str], links: Iterable[Link]) -> str:
    """Why no ring passes through all hosts, in words a person can act on ("" when one does)."""
    names, links = sorted(set(hosts)), list(links)
    if not names:
        return "no hosts were given"
    if ring_order(names, links) is not None:
        return ""
    n, adj = len(names), _adjacency(names, links)
    if n == 2:
        return f"{names[0]} and {names[1]} are not cabled to each other; two hosts need one cable"
    reasons = []
    for h in names:
        if not adj[h]:
            reasons.append(f"{h} has no Thunderbolt cable to another host")
        elif len(adj[h]) == 1:
            (peer,) = adj[h]
            count = sum(1 for link in links if link.joins(h, peer))
            if count == 1:
                reasons.append(
                    f"{h} has only one cable (to {peer}); a ring of {n} needs two per host"
                )
            else:
                reasons.append(
                    f"{h}'s {count} cables all go to {peer}; a ring of {n} needs each host "
                    "cabled to two different hosts"
                )
    if not reasons:
        groups = _components(names, adj)
        cuts = [h for h in names if len(_components([x for x in names if x != h], adj)) > 1]
        if len(groups) > 1:
            listed = "; ".join(", ".join(g) for g in groups)
            reasons.append(f"the cables form {len(groups)} separate groups: {listed}")
        elif cuts:
            reasons += [f"{h} joins two separate loops; a ring cannot pass it twice" for h in cuts]
        else:
            reasons.append(f"no single loop of cables passes through all {n} hosts")
    message = "no Thunderbolt ring through all hosts: " + "; ".join(reasons)
    fix = _one_cable_fix(names, links)
    if fix:
        message += f". A cable between {fix[0]} and {fix[1]} would close the ring"
    return message


def _addrs(addresses: Addresses, host: str, iface: str) -> list[ipaddress.IPv4Interface]:
    return [ipaddress.ip_interface(a) for a in addresses.get(host, {}).get(iface, [])]


def _host_uses(
    addresses: Addresses, host: str, net: ipaddress.IPv4Network, except_iface: str | None = None
) -> bool:
    """True when host has an address overlapping net on any port but except_iface."""
    for iface, addrs in addresses.get(host, {}).items():
        if iface != except_iface and any(
            ipaddress.ip_interface(a).network.overlaps(net) for a in addrs
        ):
            return True
    return False


def link_ips(link: Link, addresses: Addresses) -> tuple[str, str] | None:
    """(a_ip, b_ip) when both ends sit on one subnet that neither host uses on another port."""
    for a in _addrs(addresses, link.a_host, link.a_iface):
        for b in _addrs(addresses, link.b_host, link.b_iface):
            if a.network != b.network or a.ip == b.ip:
                continue
            if _host_uses(addresses, link.a_host, a.network, link.a_iface):
                continue
            if _host_uses(addresses, link.b_host, b.network, link.b_iface):
                continue
            return str(a.ip), str(b.ip)
    return None


def _between(links: Iterable[Link], x: str, y: str) -> list[Link]:
    return sorted(link for link in links if link.joins(x, y))


def ring_addresses(order: list[str], links: Iterable[Link], addresses: Addresses) -> RingAddresses:
    """The addresses each rank's hostfile entry must list, and the ring cables lacking them.

    Rank r accepts on its own entry and rank r-1 connects to it, so the entry is r's end of the
    cable(s) from r-1 (mlx.distributed_config writes the same).
    """
    links = list(links)
    if len(order) <= 1:
        return RingAddresses([[] for _ in order], [])
    own: list[list[str]] = []
    missing: list[Link] = []
    for r, host in enumerate(order):
        usable = []
        for link in _between(links, order[r - 1], host):
            pair = link_ips(link, addresses)
            if pair is None:
                if link not in missing:
                    missing.append(link)
            else:
                usable.append(pair[0] if host == link.a_host else pair[1])
        own.append(usable)
    count = min(len(u) for u in own)
    return RingAddresses([u[:count] for u in own], missing)


def _ring_links(order: list[str], links: Iterable[Link]) -> list[Link]:
    pairs = {frozenset((order[r - 1], order[r])) for r in range(len(order))}
    return sorted(link for link in links if frozenset((link.a_host, link.b_host)) in pairs)


def _free_subnet(
    base: ipaddress.IPv4Network, taken: list[ipaddress.IPv4Network]
) -> ipaddress.IPv4Network:
    """The first /30 from base up to the end of base's /16 that overlaps nothing taken."""
    for net in base.supernet(new_prefix=16).subnets(new_prefix=30):
        if net >= base and not any(net.overlaps(t) for t in taken):
            return net
    raise ValueError(f"no free /30 from {base.network_address} to the end of its /16")


def _half_configured(link: Link, addresses: Addresses) -> tuple[str, str, str, str] | None:
    """(host, iface, ip, peer_ip) completing a /30 that one end of the cable still holds,
    as after the other Mac rebooted (these settings do not survive a reboot)."""
    for host in (link.a_host, link.b_host):
        peer = link.other(host)
        for a in _addrs(addresses, host, link.iface(host)):
            hosts = list(a.network.hosts())
            if a.network.prefixlen != 30 or a.ip not in hosts:
                continue
            if _host_uses(addresses, host, a.network, link.iface(host)):
                continue
            if _host_uses(addresses, peer, a.network):
                continue
            ip = hosts[1] if a.ip == hosts[0] else hosts[0]
            return peer, link.iface(peer), str(ip), str(a.ip)
    return None


def setup_commands(
    order: list[str],
    links: Iterable[Link],
    base: str = "192.168.200.0",
    addresses: Addresses | None = None,
    bridges: Mapping[str, Mapping[str, list[str]]] | None = None,
) -> dict[str, list[str]]:
    """macOS commands giving each ring cable a /30 of its own; printed for a person, never run.

    With addresses, cables that already work are left alone, a /30 one end still holds is
    completed on the other end, and new /30s (counted up from base) avoid every subnet in use.
    Each host first turns the Thunderbolt Bridge service off and takes its ports out of the
    bridge: bridged ports carry no IP of their own and a bridged ring loops. bridges (host ->
    bridge -> members, from parse_bridge_members) says which ports are members; a host missing
    from it is assumed to have every port in bridge0, as macOS sets up, and a host with no
    bridge at all has no service to turn off. Hosts with nothing to do are left out.
    """
    addresses = addresses or {}
    taken = [
        ipaddress.ip_interface(a).network
        for ifaces in addresses.values()
        for addrs in ifaces.values()
        for a in addrs
    ]
    first = ipaddress.ip_network(f"{base}/30")
    plan: dict[str, list[tuple[str, str, str]]] = {}
    for link in _ring_links(order, links):
        if link_ips(link, addresses):
            continue
        half = _half_configured(link, addresses)
        if half:
            host, iface, ip, peer_ip = half
            plan.setdefault(host, []).append((iface, ip, peer_ip))
            continue
        net = _free_subnet(first, taken)
        taken.append(net)
        a_ip, b_ip = (str(h) for h in net.hosts())
        plan.setdefault(link.a_host, []).append((link.a_iface, a_ip, b_ip))
        plan.setdefault(link.b_host, []).append((link.b_iface, b_ip, a_ip))
    hosts = [h for h in order if h in plan] + sorted(set(plan) - set(order))
    return {h: _host_commands(plan[h], (bridges or {}).get(h)) for h in hosts}


def _bridges_of(iface: str, bridges: Mapping[str, list[str]] | None) -> Iterator[str]:
    if bridges is None:
        yield "bridge0"
        return
    yield from (b for b, members in sorted(bridges.items()) if iface in members)


def bridge_commands(ifaces: Iterable[str], bridges: Mapping[str, list[str]] | None) -> list[str]:
    """One host's commands that turn the Thunderbolt Bridge service off and take these cabled
    ports out of their bridges; printed for a person, never run. bridges: the host's bridge ->
    members (None: every port in bridge0, as macOS sets up; {}: no bridge, nothing to do)."""
    commands = [] if bridges == {} else [DISABLE_BRIDGE]
    return commands + [
        f"sudo ifconfig {bridge} deletem {iface}"
        for iface in ifaces
        for bridge in _bridges_of(iface, bridges)
    ]


def _host_commands(
    ends: list[tuple[str, str, str]], bridges: Mapping[str, list[str]] | None
) -> list[str]:
    commands = bridge_commands([iface for iface, _, _ in ends], bridges)
    for iface, ip, peer_ip in ends:
        commands.append(f"sudo ifconfig {iface} inet {ip} netmask {NETMASK_30}")
        commands.append(f"sudo route change {peer_ip} -interface {iface}")
    return commands
