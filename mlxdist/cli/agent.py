"""`mlxdist init`, `mlxdist agent` and `mlxdist status`: the node side of a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

import mlxdist
from launcher.rankspec import AGENT_PORT
from mlxdist.cli.api_options import INSECURE_OPTION, KEY_FILE_OPTION, KEY_OPTION
from mlxdist.cli.app import app
from quantize.errors import UserError

if TYPE_CHECKING:
    from launcher.hostfacts import HostFacts

console = Console(stderr=True, soft_wrap=True)


@app.command("init")
def init_cmd(
    secret_file: Path | None = typer.Option(
        None, "--secret-file", help="default ~/.mlxdist/secret"
    ),
    force: bool = typer.Option(False, help="replace an existing secret"),
) -> None:
    """Create the cluster secret that every agent and launcher shares."""
    init(secret_file, force)


@app.command("agent")
def agent_cmd(
    cluster: str = typer.Option("default", help="cluster name: launchers find only their own"),
    interface: list[str] = typer.Option([], help="interface to listen and advertise on"),
    port: int = typer.Option(AGENT_PORT, help="the agent's port"),
    secret_file: Path | None = typer.Option(None, "--secret-file", help="the cluster secret"),
    models_dir: Path | None = typer.Option(None, "--models-dir", help="where shards are kept"),
) -> None:
    """Run this node's agent: advertised by zeroconf, starts ranks when a launcher asks."""
    try:
        run_agent(cluster, interface, port, secret_file, models_dir)
    except OSError as e:  # e.g. the port is taken
        raise UserError(str(e)) from None
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@app.command("status")
def status_cmd(
    cluster: str = typer.Option("default", help="cluster name"),
    interface: list[str] = typer.Option([], help="interface to discover agents on"),
    secret_file: Path | None = typer.Option(None, "--secret-file", help="the cluster secret"),
    timeout: float = typer.Option(3.0, help="seconds to listen for agents"),
    web: bool = typer.Option(False, "--web", help="serve them as a live page until Ctrl-C"),
    port: int | None = typer.Option(None, min=1, max=65535, help="--web's port (default 8090)"),
    host: str | None = typer.Option(None, help="--web's address (default 127.0.0.1)"),
    api_key: str | None = KEY_OPTION,
    api_key_file: Path | None = KEY_FILE_OPTION,
    insecure: bool = INSECURE_OPTION,
) -> None:
    """Agents of the cluster, their memory, links and running ranks, as a table (--web: a live
    page of them)."""
    if web:
        from mlxdist.cli.api_options import api_key as read_key
        from mlxdist.cli.api_options import check_exposure
        from mlxdist.cli.status_web import status_web

        key = read_key(api_key, api_key_file)
        # The agents' facts (addresses, memory, cables) are the cluster's: not open to a network.
        check_exposure(host or "127.0.0.1", key, insecure, f"--host {host}", "the dashboard")
        raise typer.Exit(status_web(cluster, interface, secret_file, timeout, host, port, key))
    if port is not None or host is not None:
        raise UserError("--port and --host are for --web")
    raise typer.Exit(status(cluster, interface, secret_file, timeout))


def init(secret_file: Path | None, force: bool) -> None:
    from launcher.secret import create_secret, default_secret_path

    path = create_secret(secret_file or default_secret_path(), force=force)
    console.print(f"created the cluster secret {path} (mode 0600)")
    console.print(
        "give every Mac of the cluster the same file, only its owner able to read it, e.g.:\n"
        f"  scp {path} other-mac:.mlxdist/secret && ssh other-mac chmod 600 .mlxdist/secret"
    )


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
    from launcher.agent import create_agent_app, serve_agent
    from launcher.discovery import Advertiser
    from launcher.hostfacts import collect
    from launcher.interfaces import listen_addresses
    from launcher.localview import memory_available
    from launcher.secret import config_dir, load_secret

    secret = load_secret(secret_file)
    facts = collect(node_id_path=config_dir() / "node_id")
    addresses = listen_addresses(facts, interfaces)
    models = Path(models_dir or config_dir() / "models")
    data = agent_facts(facts, cluster, port, addresses)

    def live_facts() -> dict:  # memory alone is read again: the rest takes seconds on a Mac
        return data | {"memory_available": memory_available()}

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
    from launcher.agent_client import AgentError
    from launcher.cluster import discover_nodes
    from launcher.secret import load_secret

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
