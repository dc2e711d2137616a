"""`mlxdist status --cluster NAME --web`: the dashboard of a cluster's agents before any model
runs. The agents are found as `mlxdist status` finds them; every 2 s each is asked for its
memory, its ranks and its transfers (fetches from the Hub, pushes from the launcher: see
transfers.py), every 10 s the cluster is looked for again (agents that come show up), and an
agent that stops answering is shown "gone" with an event naming it.

Served by the CLI's own process (mlxdist/cli/status_web.py); `python -m
mlxdist.serving.dashboard.agents` runs it too.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from launcher.agent_client import AgentError
from launcher.cluster import discover_nodes
from launcher.clusterview import agent_node, cables, ports_of, ring
from launcher.hostfacts import collect
from launcher.interfaces import listen_addresses
from launcher.remote import Node
from launcher.topology import cable_graph
from mlxdist.serving.dashboard.board import Board
from mlxdist.serving.dashboard.transfers import NodeTransfers
from quantize.errors import UserError

REFRESH = 2.0  # seconds between two readings of every agent's memory and ranks
REDISCOVER = 10.0  # seconds between two looks for the cluster's agents
ASK_TIMEOUT = 2.0  # an agent that takes longer is not answering
DEFAULT_PORT = 8090


class Agents:
    """The cluster's agents as the dashboard shows them, kept fresh by watch()."""

    def __init__(
        self, board: Board, cluster: str, interfaces: list[str], secret: bytes, timeout: float
    ):
        self.board, self.cluster = board, cluster
        self.interfaces, self.secret, self.timeout = interfaces, secret, timeout
        self.addresses: list[str] | None = None  # where to look, read once
        self.nodes: dict[str, Node] = {}  # by node id: an agent keeps its place across looks
        self.ranks: dict[str, list[int]] = {}
        self.gone: set[str] = set()  # node ids that stopped answering
        self.transfers: dict[str, NodeTransfers] = {}  # by node id
        self.shown: dict[str, dict | None] = {}  # by node id: its "transfer" field
        self._said: dict[str, str] = {}  # the watch's last failure of each step
        self._lock = threading.Lock()

    # ---- the cluster's make-up ----

    def discover(self) -> None:
        """Looks for the agents; those not seen before join (said in an event)."""
        if self.addresses is None:
            self.addresses = listen_addresses(collect(), self.interfaces)
        where = (self.cluster, self.interfaces, self.secret, self.timeout, self.addresses)
        found = discover_nodes(*where)
        joined = []
        with self._lock:
            for node in found:
                key = node.client.node_id
                if key not in self.nodes:
                    joined.append(node)
                    self.nodes[key] = node
                elif key in self.gone:  # back, maybe on a new address or after a restart
                    self.nodes[key] = node
        for node in joined:
            self.ranks[node.client.node_id] = self._ranks(node) or []
        if joined:
            self.board.set_static(self.static())
            for node in joined:
                text = f"agent {node.name} ({node.address}) of cluster {self.cluster!r} found"
                self.board.event("info", text, node.name)

    def static(self) -> dict:
        """The snapshot's nodes, cables and ring from what the agents last said."""
        with self._lock:
            known = list(self.nodes.items())
        rows = []
        for key, node in known:
            row = agent_node(node.name, node.address, node.facts, self.ranks.get(key))
            row["transfer"] = self.shown.get(key)
            if key in self.gone:
                row["state"] = "gone"
            rows.append(row)
        facts = {node.name: node.facts for _, node in known}
        ports = ports_of(facts)
        links = cable_graph(ports)
        return {"nodes": rows, "cables": cables(ports, facts), "ring": ring(sorted(ports), links)}

    # ---- each agent's figures ----

    def _ranks(self, node: Node) -> list[int] | None:
        """The ranks the agent runs now; None when it does not answer."""
        try:
            runs = node.client.ranks(timeout=ASK_TIMEOUT)
        except AgentError:
            return None
        return sorted(int(r["rank"]) for r in runs if r.get("alive"))

    def _read(self, key: str, node: Node) -> tuple[str, dict | None, str]:
        """(node id, the node's fresh figures or None when it does not answer, why not)."""
        try:
            node.facts = node.client.request("GET", "/facts", timeout=ASK_TIMEOUT)
            runs = node.client.ranks(timeout=ASK_TIMEOUT)
        except AgentError as e:
            return key, None, str(e)
        ranks = sorted(int(r["rank"]) for r in runs if r.get("alive"))
        row = agent_node(node.name, node.address, node.facts, ranks)
        fresh = {k: row[k] for k in ("memory_used", "state", "ranks")}
        return key, fresh | {"transfers": _transfers(node)}, ""

    def refresh(self, pool: ThreadPoolExecutor) -> None:
        """Every agent asked at once; those that stop (or start again) answering are told."""
        with self._lock:
            known = list(self.nodes.items())
        figures, changed = {}, False
        for key, fresh, why in pool.map(lambda kv: self._read(*kv), known):
            node = self.nodes[key]
            if fresh is None:
                if key not in self.gone:
                    self.gone.add(key)
                    changed = True
                    text = f"the agent on {node.name} ({node.address}) stopped answering: {why}"
                    self.board.event("failed", text, node.name)
                self.shown[key] = None
                figures[node.name] = {"state": "gone", "transfer": None}
                continue
            if key in self.gone:
                self.gone.discard(key)
                changed = True
                self.board.event("info", f"the agent on {node.name} answers again", node.name)
            self.ranks[key] = fresh["ranks"]
            answer = fresh.pop("transfers")
            figures[node.name] = fresh | self._transfer(key, node.name, answer)
        if changed:
            self.board.set_static(self.static())
        self.board.update_nodes(figures)

    def _transfer(self, key: str, name: str, answer: dict | None) -> dict:
        """The node's "transfer" figure from its agent's answer, and the events of its
        transfers; no answer (a timeout): the figure as it was."""
        if answer is None:
            return {"transfer": self.shown.get(key)}
        watch = self.transfers.setdefault(key, NodeTransfers(name))
        shown, said = watch.step(answer, time.monotonic())
        for kind, text in said:
            self.board.event(kind, text, name)
        self.shown[key] = shown
        return {"transfer": shown}

    def watch(self) -> None:
        """Refreshes every REFRESH s and looks for agents every REDISCOVER s, until the end."""
        looked = time.monotonic()
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="agents") as pool:
            while True:
                time.sleep(REFRESH)
                self._guarded("reading the agents", lambda: self.refresh(pool))
                if time.monotonic() - looked >= REDISCOVER:
                    looked = time.monotonic()
                    self._guarded("looking for agents", self.discover)

    def _guarded(self, what: str, step) -> None:
        """One step of the watch; a failure (two agents as one node id, a network gone) is an
        event, and the watch goes on: the page must not freeze on it."""
        try:
            step()
        except Exception as e:  # noqa: BLE001 - whatever it was, said and kept on
            text = f"{what}: {e or type(e).__name__}"
            if self._said.get(what) != text:  # once, not every 2 s while it lasts
                self.board.event("info", text)
            self._said[what] = text
        else:
            self._said.pop(what, None)


def _transfers(node: Node) -> dict | None:
    """The agent's fetches and pushes: none from an agent older than the route (404), None
    when it did not answer (its other figures tell whether it is gone)."""
    try:
        return node.client.transfers(timeout=ASK_TIMEOUT)
    except AgentError as e:
        return {"fetches": [], "uploads": []} if e.status == 404 else None


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything else: a port taken is one line."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host.strip("[]")).version == 6 else None
    except ValueError:
        family = None
    try:
        return socket.create_server((host.strip("[]"), port), family=family or socket.AF_INET)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def url(host: str, port: int) -> str:
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def serve(
    cluster: str,
    interfaces: list[str],
    secret_file: Path | None,
    timeout: float,
    host: str,
    port: int,
    api_key: str | None = None,
) -> None:
    """Serves the agents' dashboard on host:port until Ctrl-C; with api_key, its data only to
    those who send it."""
    import uvicorn
    from fastapi import FastAPI

    from launcher.secret import load_secret
    from mlxdist.serving.dashboard.routes import add_dashboard
    from mlxdist.serving.guard import Guard, Policy

    secret = load_secret(secret_file)
    sock = listen(host, port)
    board = Board("agents")
    agents = Agents(board, cluster, interfaces, secret, timeout)
    agents.discover()
    if not agents.nodes:
        print(
            f"no agent of cluster {cluster!r} answered yet: looking again every {REDISCOVER:.0f} s",
            file=sys.stderr,
        )
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    add_dashboard(app, board)
    board.start()
    threading.Thread(target=agents.watch, name="agents", daemon=True).start()
    config = uvicorn.Config(
        Guard(app, Policy(host=host, api_key=api_key)), log_level="warning", lifespan="off"
    )
    print(f"dashboard of cluster {cluster} at {url(host, port)} (Ctrl-C stops)", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
