"""`mlxdist init`, `mlxdist agent` and `mlxdist status`: the node side of a cluster."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

import mlxdist
from launcher.agent import create_agent_app, serve_agent
from launcher.agent_client import AgentClient, AgentError
from launcher.discovery import Advertiser
from launcher.hostfacts import HostFacts, collect
from launcher.secret import config_dir, create_secret, default_secret_path, load_secret

AGENT_PORT = 52417
console = Console(stderr=True, soft_wrap=True)


class AgentSetupError(Exception):
    """The agent cannot start as asked; the message says what to do."""


def init(secret_file: Path | None, force: bool) -> None:
    path = create_secret(secret_file or default_secret_path(), force=force)
    console.print(f"created the cluster secret {path} (mode 0600)")
    console.print(
        "give every Mac of the cluster the same file, only its owner able to read it, e.g.:\n"
        f"  scp {path} other-mac:.mlxdist/secret && ssh other-mac chmod 600 .mlxdist/secret"
    )


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
            raise AgentSetupError(
                "give --interface: the agent listens only on interfaces you name "
                "(on a Mac, the Thunderbolt Bridge, bridge0, by default)"
            )
    addresses = []
    for name in interfaces:
        ips = [_ip(a) for a in facts.addresses.get(name, []) if ":" not in a]
        if not ips:
            known = ", ".join(sorted(facts.addresses)) or "none"
            raise AgentSetupError(f"interface {name} has no IPv4 address (interfaces: {known})")
        addresses += ips
    return addresses


def agent_facts(facts: HostFacts, cluster: str, port: int, addresses: list[str]) -> dict:
    import mlx.core as mx

    data = facts.to_dict()
    data |= {
        "cluster": cluster,
        "agent_port": port,
        "listen": addresses,
        "mlx_version": mx.__version__,
        "mlxdist_version": mlxdist.__version__,
    }
    return data


def run_agent(
    cluster: str,
    interfaces: list[str],
    port: int,
    secret_file: Path | None,
    models_dir: Path | None,
) -> None:
    secret = load_secret(secret_file)
    facts = collect(node_id_path=config_dir() / "node_id")
    addresses = listen_addresses(facts, interfaces)
    models = Path(models_dir or config_dir() / "models")
    data = agent_facts(facts, cluster, port, addresses)

    def live_facts() -> dict:
        fresh = collect(node_id_path=config_dir() / "node_id")
        return data | {"memory_available": fresh.memory_available}

    app = create_agent_app(secret, models, live_facts)
    advertiser = Advertiser(cluster, facts.node_id, addresses, port, data)
    console.print(
        f"agent {facts.hostname} ({facts.node_id[:8]}) of cluster {cluster!r} on "
        + ", ".join(f"{a}:{port}" for a in addresses)
        + f"; models in {models}"
    )
    try:
        serve_agent(app, addresses, port, log_level="warning")
    finally:
        advertiser.close()


def status(cluster: str, interfaces: list[str], secret_file: Path | None, timeout: float) -> int:
    """A table of the cluster's agents: memory, links and running ranks."""
    from .cluster import discover_nodes

    secret = load_secret(secret_file)
    nodes = discover_nodes(cluster, interfaces, secret, timeout)
    table = Table(title=f"cluster {cluster!r}: {len(nodes)} agents")
    for col in ("node", "address", "chip", "memory GB", "available GB", "links", "ranks"):
        table.add_column(col)
    for node in nodes:
        facts = node.facts
        try:
            running = [r for r in node.client.ranks() if r["alive"]]
            ranks = ", ".join(str(r["rank"]) for r in running) or "-"
        except AgentError as e:
            ranks = f"error: {e}"
        links = sum(len(p.get("peer_uuids", [])) for p in facts.get("thunderbolt", []))
        table.add_row(
            node.name,
            node.address,
            facts.get("chip", "?"),
            f"{facts.get('memory_total', 0) / 1e9:.0f}",
            f"{facts.get('memory_available', 0) / 1e9:.0f}",
            str(links),
            ranks,
        )
    out = Console()
    # Piped output keeps whole cells: a table cut at 80 columns loses its addresses.
    (out if out.is_terminal else Console(width=200)).print(table)
    return 0 if nodes else 1


def client_for(address: str, port: int, secret: bytes) -> AgentClient:
    return AgentClient(f"http://{address}:{port}", secret)
