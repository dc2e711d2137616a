"""Agents find each other with zeroconf (mDNS), only on the interfaces they are given.

The advertisement stays small whatever the Mac: who the agent is (cluster, node id, port, host,
versions) and a digest of its facts. The full facts (every Thunderbolt port, memory, RDMA
devices) come from the agent's signed API; the digest tells a launcher whether what it fetched
is what was advertised.

An advertisement proves nothing: anyone on the link can make one. An announced agent is kept
only once its signed hello proves it knows the cluster secret (`verified`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from zeroconf import (
    NonUniqueNameException,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
)

from quantize.errors import UserError

from .agent_client import AgentClient, AgentError
from .mdns_scope import scoped_zeroconf

SERVICE = "_mlxdist._tcp.local."
MAX_ENTRY = 255  # bytes of one TXT entry, "key=value" whole: a DNS character-string's length byte
# RFC 6763 6.2: a TXT record under 400 bytes fits one 512-byte DNS message with the rest of
# the answer; ours is about 200.
MAX_TXT = 400
MAX_LABEL = 63  # bytes of the service instance name, one DNS label
DIGEST_CHARS = 16
# The facts that do not change while an agent runs; memory_available does, so it is left out,
# and so are a port's address and speed (the ring setup and a re-plugged cable change them).
STABLE_FACTS = ("chip", "memory_total", "thunderbolt", "rdma_devices")
STABLE_PORT = ("interface", "domain_uuid", "peer_uuids")


class AdvertiseError(UserError):
    """The advertisement cannot be made to fit; the message says which part and what to do."""


@dataclass
class Agent:
    """An agent as its advertisement describes it."""

    node_id: str
    cluster: str
    addresses: list[str]
    port: int
    txt: dict[str, str] = field(default_factory=dict)

    @property
    def hostname(self) -> str:
        return self.txt.get("host", self.node_id)

    @property
    def url(self) -> str:
        return f"http://{self.addresses[0]}:{self.port}"

    @property
    def name(self) -> str:
        """Who the advertisement says this is, for a message: host and address."""
        return f"{self.hostname} ({self.url})"

    def advertised(self, facts: Mapping) -> bool:
        """True when facts are what this agent advertised (an agent of an older version that
        advertises no digest is taken at its word)."""
        digest = self.txt.get("facts")
        return digest is None or digest == facts_digest(facts)


def facts_digest(facts: Mapping) -> str:
    """The first hex digits of sha256 over the canonical JSON of the stable facts."""
    stable = {k: facts.get(k) for k in STABLE_FACTS}
    ports = stable["thunderbolt"] if isinstance(stable["thunderbolt"], list) else []
    stable["thunderbolt"] = [
        {k: p.get(k) for k in STABLE_PORT} for p in ports if isinstance(p, Mapping)
    ]
    text = json.dumps(stable, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def _entry_bytes(key: str, value: str) -> int:
    return len(f"{key}={value}".encode())


def _cut(key: str, value: str, room: int) -> str:
    """value shortened (on a character boundary) so that key=value takes at most room bytes."""
    while value and _entry_bytes(key, value) > room:
        value = value[:-1]
    return value


def txt_size(txt: Mapping[str, str]) -> int:
    """Bytes of the TXT record on the wire: each entry and its length byte."""
    return sum(1 + _entry_bytes(k, v) for k, v in txt.items())


def txt_record(cluster: str, node_id: str, port: int, facts: Mapping) -> dict[str, str]:
    """The TXT record: who the agent is, its versions and the digest of its facts.

    A long host name is cut to fit; a cluster name or node id that cannot fit is an
    AdvertiseError (they are how launchers find and tell agents apart, so they stay whole).
    """
    label = f"{node_id}.{SERVICE}".split(".")[0]
    if len(label.encode()) > MAX_LABEL:
        raise AdvertiseError(
            f"node id {node_id!r} is over {MAX_LABEL} bytes, too long for a service name: "
            "remove ~/.mlxdist/node_id to make a new one"
        )
    txt = {
        "cluster": cluster,
        "id": node_id,
        "port": str(port),
        "os": str(facts.get("os", "")),
        "mlx": str(facts.get("mlx_version", "")),
        "mlxdist": str(facts.get("mlxdist_version", "")),
        "facts": facts_digest(facts),
    }
    for key, value in txt.items():
        if _entry_bytes(key, value) > MAX_ENTRY:
            what = "cluster name" if key == "cluster" else f"TXT entry {key}"
            raise AdvertiseError(
                f"the {what} {value[:40]!r}... is {_entry_bytes(key, value)} bytes with its key; "
                f"at most {MAX_ENTRY} fit a TXT entry: choose a shorter one"
            )
    room = min(MAX_ENTRY, MAX_TXT - txt_size(txt) - 1)
    txt["host"] = _cut("host", str(facts.get("hostname", "")), room)
    if txt_size(txt) > MAX_TXT:
        raise AdvertiseError(
            f"the advertisement is {txt_size(txt)} bytes, over the {MAX_TXT} one DNS message "
            f"holds: shorten the cluster name ({len(cluster.encode())} bytes)"
        )
    return txt


class Advertiser:
    """Keeps one agent advertised until closed."""

    def __init__(self, cluster: str, node_id: str, addresses: list[str], port: int, facts: Mapping):
        if not addresses:
            raise ValueError("an agent needs at least one address to advertise on")
        properties = txt_record(cluster, node_id, port, facts)  # before any socket is opened
        self.zc = scoped_zeroconf(addresses)  # hears and answers only the named links
        self.info = ServiceInfo(
            SERVICE,
            f"{node_id}.{SERVICE}",
            addresses=[socket.inet_aton(a) for a in addresses],
            port=port,
            properties=properties,
            server=f"{node_id}.local.",
        )
        try:
            self.zc.register_service(self.info)
        except NonUniqueNameException:
            self.zc.close()
            raise AdvertiseError(
                f"another agent already announces node id {node_id} on this network (a cloned "
                "disk?): remove ~/.mlxdist/node_id here and start the agent again"
            ) from None

    def close(self) -> None:
        try:
            self.zc.unregister_service(self.info)
        finally:
            self.zc.close()


def _decode(properties: dict) -> dict[str, str]:
    out = {}
    for k, v in properties.items():
        key = k.decode() if isinstance(k, bytes) else str(k)
        out[key] = v.decode() if isinstance(v, bytes) else ("" if v is None else str(v))
    return out


def _common_bits(a: str, b: str) -> int:
    x = int(ipaddress.IPv4Address(a)) ^ int(ipaddress.IPv4Address(b))
    return 32 - x.bit_length()


def nearest_first(addresses: list[str], local: list[str]) -> list[str]:
    """An agent's addresses, those sharing the most leading bits with one of ours first: over
    cables alone a peer's other /30s are out of reach (no routing between cables)."""
    if not local:
        return list(addresses)
    return sorted(addresses, key=lambda a: -max(_common_bits(a, mine) for mine in local))


def browse(cluster: str, interfaces: list[str], timeout: float = 3.0) -> list[Agent]:
    """Every advertisement of this cluster seen on the interfaces within timeout seconds, by
    node id, unverified: two that claim one node id are both kept (`verified` tells them apart)."""
    zc = scoped_zeroconf(interfaces)  # records from other links are never read
    names: set[str] = set()

    def on_change(zeroconf, service_type, name, state_change):
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            names.add(name)

    browser = ServiceBrowser(zc, SERVICE, handlers=[on_change])
    try:
        time.sleep(timeout)
        agents = []
        for name in sorted(names):
            info = zc.get_service_info(SERVICE, name, timeout=2000)
            if info is None:
                continue
            txt = _decode(info.properties)
            if txt.get("cluster") != cluster:
                continue
            addresses = [socket.inet_ntoa(a) for a in info.addresses if len(a) == 4]
            addresses = nearest_first(addresses, interfaces)
            node_id = txt.get("id", name)
            agents.append(Agent(node_id, cluster, addresses, int(info.port or 0), txt))
        return sorted(agents, key=lambda a: (a.node_id, a.url))
    finally:
        browser.cancel()
        zc.close()


class CollisionError(UserError):
    """Two agents that both prove they know the secret answer as one node id."""


def verified(
    agents: list[Agent], secret: bytes, timeout: float = 5.0
) -> list[tuple[Agent, AgentClient]]:
    """The announced agents whose signed hello proves they know the secret and are the node
    they advertised, each with its client bound to that agent's node id and boot id.

    An announcement without such an answer is dropped: it is never listed, planned, pushed to or
    started on. Two agents that prove one node id are both refused (CollisionError); one agent
    announced at two addresses (one boot id) is kept once.
    """

    def hello(agent: Agent) -> AgentClient | None:
        client = AgentClient(agent.url, secret, node_id=agent.node_id)
        try:
            client.hello(timeout=timeout)
            return client
        except AgentError:
            client.close()
            return None

    # All at once: an announcement that never answers costs one timeout, not one each.
    reachable = [a for a in agents if a.addresses]
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(reachable)))) as pool:
        clients = list(pool.map(hello, reachable))
    kept: dict[str, tuple[Agent, AgentClient]] = {}
    for agent, client in zip(reachable, clients):
        if client is None:
            continue
        seen = kept.get(client.node_id)
        if seen is None:
            kept[client.node_id] = (agent, client)
        elif seen[1].boot_id == client.boot_id:
            client.close()  # the same agent process, announced twice
        else:
            raise CollisionError(
                f"two agents answer as node {client.node_id}: {seen[0].url} and {agent.url}; "
                "on one of them remove ~/.mlxdist/node_id and restart its agent"
            )
    return list(kept.values())
