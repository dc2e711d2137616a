"""Agents find each other with zeroconf (mDNS), only on the interfaces they are given."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field

from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

SERVICE = "_mlxdist._tcp.local."
_MAX_TXT = 255  # bytes per TXT value (DNS character-string)


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


def txt_record(cluster: str, node_id: str, port: int, facts: dict) -> dict[str, str]:
    """The TXT record: cluster, node id and the host facts a planner needs, each value short."""
    txt = {
        "cluster": cluster,
        "id": node_id,
        "port": str(port),
        "host": facts.get("hostname", ""),
        "chip": facts.get("chip", ""),
        "mem": str(facts.get("memory_total", 0)),
        "avail": str(facts.get("memory_available", 0)),
        "gpu": str(facts.get("gpu_cores", 0)),
        "os": facts.get("os", ""),
        "mlx": facts.get("mlx_version", ""),
        "ver": facts.get("mlxdist_version", ""),
    }
    ports = [
        [p.get("interface"), p.get("ip"), p.get("domain_uuid"), p.get("peer_uuids", [])]
        for p in facts.get("thunderbolt", [])
    ]
    if ports:
        txt["tb"] = json.dumps(ports, separators=(",", ":"))
    for key, value in txt.items():
        if len(value.encode()) > _MAX_TXT:
            raise ValueError(f"TXT value {key} is over {_MAX_TXT} bytes")
    return txt


class Advertiser:
    """Keeps one agent advertised until closed."""

    def __init__(self, cluster: str, node_id: str, addresses: list[str], port: int, facts: dict):
        if not addresses:
            raise ValueError("an agent needs at least one address to advertise on")
        self.zc = Zeroconf(interfaces=addresses)
        self.info = ServiceInfo(
            SERVICE,
            f"{node_id}.{SERVICE}",
            addresses=[socket.inet_aton(a) for a in addresses],
            port=port,
            properties=txt_record(cluster, node_id, port, facts),
            server=f"{node_id}.local.",
        )
        self.zc.register_service(self.info)

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


def browse(cluster: str, interfaces: list[str], timeout: float = 3.0) -> list[Agent]:
    """Agents of this cluster seen on the interfaces within timeout seconds, by node id."""
    zc = Zeroconf(interfaces=interfaces)
    names: set[str] = set()

    def on_change(zeroconf, service_type, name, state_change):
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            names.add(name)

    browser = ServiceBrowser(zc, SERVICE, handlers=[on_change])
    try:
        time.sleep(timeout)
        agents = {}
        for name in sorted(names):
            info = zc.get_service_info(SERVICE, name, timeout=2000)
            if info is None:
                continue
            txt = _decode(info.properties)
            if txt.get("cluster") != cluster:
                continue
            addresses = [socket.inet_ntoa(a) for a in info.addresses if len(a) == 4]
            agents[txt.get("id", name)] = Agent(
                txt.get("id", name), cluster, addresses, int(info.port or 0), txt
            )
        return [agents[k] for k in sorted(agents)]
    finally:
        browser.cancel()
        zc.close()
