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
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace

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


# What one look at the network considers, whatever strangers announce: a launcher's browse and
# verification stay within a few seconds under a flood of fake names.
MAX_ANNOUNCEMENTS = 64  # of this cluster, verified at most
MAX_NAMES = 1024  # names of any cluster read from the cache
MAX_ADDRESSES = 8  # per announcement, each said hello to
RESOLVE_WORKERS = 16
RESOLVE_MS = 2000
HELLO_WORKERS = MAX_ANNOUNCEMENTS  # every announcement's nearest address asked at once


def _all_within(work, items: list, workers: int, seconds: float) -> list:
    """work(item) for every item at once (workers threads), each result or None when it was not
    done within seconds; what is still running then is left to finish on its own."""
    if not items:
        return []
    pool = ThreadPoolExecutor(max_workers=min(workers, len(items)))
    futures = [pool.submit(work, item) for item in items]
    wait(futures, timeout=seconds)
    pool.shutdown(wait=False, cancel_futures=True)
    done = [f.done() and not f.cancelled() and f.exception() is None for f in futures]
    return [f.result() if ok else None for f, ok in zip(futures, done)]


def _agent(info: ServiceInfo | None, cluster: str, name: str, local: list[str]) -> Agent | None:
    if info is None:
        return None
    txt = _decode(info.properties)
    if txt.get("cluster") != cluster:
        return None
    addresses = [socket.inet_ntoa(a) for a in info.addresses if len(a) == 4]
    addresses = nearest_first(addresses, local)[:MAX_ADDRESSES]
    return Agent(txt.get("id", name), cluster, addresses, int(info.port or 0), txt)


def browse(
    cluster: str, interfaces: list[str], timeout: float = 3.0, notes: list[str] | None = None
) -> list[Agent]:
    """Every advertisement of this cluster seen on the interfaces within timeout seconds, by
    node id, unverified: two that claim one node id are both kept (`verified` tells them apart).

    Names whose records are not cached are resolved all at once, within 2 s; at most
    MAX_ANNOUNCEMENTS are kept, and a line saying so goes to notes when more were seen."""
    zc = scoped_zeroconf(interfaces)  # records from other links are never read
    names: set[str] = set()

    def on_change(zeroconf, service_type, name, state_change):
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            names.add(name)

    browser = ServiceBrowser(zc, SERVICE, handlers=[on_change])
    try:
        time.sleep(timeout)
        seen = sorted(names)[:MAX_NAMES]
        agents, missing = [], []
        for name in seen:  # the cache first: an announcement usually brings all its records
            info = ServiceInfo(SERVICE, name)
            if info.load_from_cache(zc):
                agents.append(_agent(info, cluster, name, interfaces))
            else:
                missing.append(name)
        room = max(0, MAX_ANNOUNCEMENTS - sum(a is not None for a in agents))
        asked = missing[:room]

        def resolve(name: str) -> Agent | None:
            info = zc.get_service_info(SERVICE, name, timeout=RESOLVE_MS)
            return _agent(info, cluster, name, interfaces)

        agents += _all_within(resolve, asked, RESOLVE_WORKERS, RESOLVE_MS / 1000 + 1)
        found = sorted((a for a in agents if a is not None), key=lambda a: (a.node_id, a.url))
        unread = len(names) - len(seen) + len(missing) - len(asked)
        left = unread + max(0, len(found) - MAX_ANNOUNCEMENTS)
        if notes is not None and left > 0:
            notes.append(
                f"{len(names)} announcements were seen, more than the {MAX_ANNOUNCEMENTS} of "
                "this cluster looked at (someone on the link may be flooding it): "
                f"{left} left unread"
            )
        return found[:MAX_ANNOUNCEMENTS]
    finally:
        browser.cancel()
        zc.close()


class CollisionError(UserError):
    """Two agents that both prove they know the secret answer as one node id."""


def why_unproven(error: AgentError) -> str:
    """What a failed hello says about the agent, in words a user can act on."""
    text = str(error)
    if error.status == 401 and text == "stale":
        return "its clock differs from this machine's by more than 30 s: run `mlxdist doctor` on it"
    if "did not prove it knows the cluster secret" in text:
        return "does not know this cluster's secret"
    return text


def verified(
    agents: list[Agent],
    secret: bytes,
    timeout: float = 5.0,
    notes: list[str] | None = None,
    deadline: float = 10.0,
) -> list[tuple[Agent, AgentClient]]:
    """The announced agents whose signed hello proves they know the secret and are the node
    they advertised, each with its client bound to that agent's node id and boot id.

    Every advertised address is said hello to; the nearest that proves the node id is the one
    kept (the Agent returned has it first: its url): a stranger answering for the name with its
    own address does not hide the real agent. An announcement without such an answer is
    dropped, never listed, planned, pushed to or started on, and one line saying why goes to
    notes. Two agents that prove one node id are both refused (CollisionError); one agent
    announced at two addresses (one boot id) is kept once. deadline: seconds for them all.
    """
    # All at once, each announcement's nearest address first: a flood of announcements that
    # never answer costs the deadline at most, and the real agents are asked early.
    tasks = [
        (i, address)
        for depth in range(MAX_ADDRESSES)
        for i, agent in enumerate(agents)
        if depth < len(agent.addresses)
        for address in [agent.addresses[depth]]
    ]

    def hello(task: tuple[int, str]) -> AgentClient | AgentError:
        agent = agents[task[0]]
        client = AgentClient(f"http://{task[1]}:{agent.port}", secret, node_id=agent.node_id)
        try:
            client.hello(timeout=timeout)
            return client
        except AgentError as e:
            client.close()
            return e
        except Exception as e:  # an address httpx cannot use: that announcement's fault
            client.close()
            return AgentError(f"cannot reach the agent at {client.base_url}: {e}")

    outcome = dict(zip(tasks, _all_within(hello, tasks, HELLO_WORKERS, deadline)))
    kept: dict[str, tuple[Agent, AgentClient]] = {}
    for i, agent in enumerate(agents):
        results = [(a, outcome.get((i, a))) for a in agent.addresses]
        proved = [(a, r) for a, r in results if isinstance(r, AgentClient)]
        for _, extra in proved[1:]:
            extra.close()
        if not proved:
            if notes is not None:
                notes.append(_unproven_line(agent, results))
            continue
        address, client = proved[0]
        agent = replace(agent, addresses=[address] + [a for a in agent.addresses if a != address])
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


def _unproven_line(agent: Agent, results: list) -> str:
    who = f"the agent announced as {agent.hostname} (node {agent.node_id})"
    if not results:
        return f"{who} is left out: its announcement gives no address"
    reasons = []
    for address, result in results:
        why = why_unproven(result) if isinstance(result, AgentError) else "no answer in time"
        reasons.append(why if len(results) == 1 else f"at {address}: {why}")
    return f"{who} is left out: " + "; ".join(reasons)
