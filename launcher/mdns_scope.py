"""A zeroconf that hears, and so answers, only the links of the addresses it is given.

python-zeroconf given interface addresses joins the mDNS group on those interfaces alone, but it
reads through a socket bound to 0.0.0.0:5353 and one bound to each address: a unicast query to
any other address of the host is read and answered, and so is one to a named address that
arrives over another link (Linux and macOS both deliver it: the weak host model). It takes no
sockets from its caller and has no filter of its own. So each of its listeners here drops every
datagram whose source is not in the subnet of a named address: RFC 6762 section 11's source
address check, kept to the named interfaces. A peer on another link then gets no answer (what
it would send to is not read), and its records never reach a launcher's browse (a peer on a
named link, or one forging a source inside its subnet, still can: only a signed hello makes an
agent, launcher/discovery.py).

Not chosen: binding the listen socket to the group address 224.0.0.251, which Linux and BSD
both allow and which does keep unicast out. Zeroconf answers a question with the unicast bit
(a name probe, a browser's first query) through the socket it came in on, and macOS, as BSD,
sends from a socket bound to a multicast address with that address as the source (udp_output
takes the bound address), which no peer accepts; and macOS would still hand a named address's
unicast from another link to the per-address socket (IP_BOUND_IF restricts receiving only on
restricted interfaces). Linux would have needed SO_BINDTODEVICE on top, which macOS lacks.

Not told apart: two links that share a subnet (169.254/16 self-assigned on both), and a peer
that forges a source address of the named subnet (it never sees the answer, which is routed to
that address on the named link).
"""

from __future__ import annotations

import ipaddress
import threading

import ifaddr  # zeroconf's own dependency: the interfaces' addresses and prefixes
import zeroconf
from zeroconf import Zeroconf, _engine
from zeroconf._listener import AsyncListener

from quantize.errors import UserError

TESTED = "0.154"  # the zeroconf release the hook below was written against and tested with
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_SWAP = threading.Lock()  # _engine.AsyncListener is swapped while one Zeroconf is made


def link_networks(addresses: list[str]) -> list[Network]:
    """The subnet of each address, from its interface's prefix (the address alone when no
    interface holds it)."""
    prefixes: dict[str, int] = {}
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            address = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            prefixes[address] = ip.network_prefix
    networks = []
    for a in addresses:
        full = ipaddress.ip_address(a).max_prefixlen
        networks.append(ipaddress.ip_network(f"{a}/{prefixes.get(a, full)}", strict=False))
    return networks


def on_link(source: str, networks: list[Network]) -> bool:
    """Whether a datagram's source address is in one of the networks."""
    try:
        ip = ipaddress.ip_address(source.split("%")[0])
    except ValueError:
        return False
    return any(ip in n for n in networks if n.version == ip.version)


class _ScopedListener(AsyncListener):
    """zeroconf's listener, reading only what comes from the named links."""

    def __init__(self, zc: Zeroconf, networks: list[Network]):
        super().__init__(zc)
        self.networks = networks

    def datagram_received(self, data: bytes, addrs: tuple) -> None:
        if on_link(addrs[0], self.networks):
            super().datagram_received(data, addrs)


def scoped_zeroconf(addresses: list[str]) -> Zeroconf:
    """Zeroconf(interfaces=addresses) whose every listener reads only the named links.

    The one hook into zeroconf's internals: the engine makes each socket's listener through the
    name `_engine.AsyncListener`, replaced for the construction (which makes them all, in its own
    thread, before it returns). Should a zeroconf release make them otherwise, this refuses in
    one line (UserError) rather than answer every link unseen (tests/test_mdns_scope.py).
    """
    networks = link_networks(addresses)
    with _SWAP:
        original = _engine.AsyncListener
        _engine.AsyncListener = lambda zc: _ScopedListener(zc, networks)
        try:
            zc = Zeroconf(interfaces=addresses)
        finally:
            _engine.AsyncListener = original
    listeners = list(zc.engine.protocols)
    if not listeners or not all(isinstance(p, _ScopedListener) for p in listeners):
        zc.close()
        raise UserError(
            f"zeroconf {zeroconf.__version__} makes its listeners otherwise than mlxdist knows, "
            f"so mDNS cannot be kept to the named interfaces: pip install 'zeroconf=={TESTED}.*'"
        )
    return zc
