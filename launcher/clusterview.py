"""The cluster as the launcher sees it, in the dashboard's shapes (the contract's nodes, cables,
ring and plan): from the agents' facts before a launch (`mlxdist status --web`), and as the view
rank 0 is given at a launch (RankSpec.view), which its own figures then complete by name.

Pure functions: facts in (HostFacts.to_dict(), an agent's /facts), dicts out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

from .gpumem import MIB
from .hostfacts import ThunderboltPort
from .rankspec import MAX_VIEW_BYTES
from .topology import Link, cable_graph, ring_order

_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*Gb/s")

# The node fields a rank fills in once it runs (the contract's), none known before.
_RANK_FIELDS = ("layers", "experts", "weights", "bytes_per_token", "heartbeat_age", "load")


def _positive(value) -> int | None:
    try:
        n = int(value or 0)
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


def machine(facts: Mapping) -> dict:
    """One machine's chip and memory figures from its facts: memory_usable is Metal's working
    set (None when unknown), wired_limit the iogpu.wired_limit_mb in force, else the working set
    (the GPU's limit either way)."""
    working_set = _positive(facts.get("gpu_working_set"))
    wired_mb = _positive(facts.get("wired_limit_mb"))
    return {
        "chip": str(facts.get("chip") or "").strip() or None,
        "memory_total": _positive(facts.get("memory_total")),
        "memory_usable": working_set,
        "wired_limit": wired_mb * MIB if wired_mb else working_set,
    }


def agent_node(
    name: str, address: str | None, facts: Mapping, ranks: list[int] | None = None
) -> dict:
    """An agent as the contract's node: its machine, memory used (total less available), and
    "running" while it runs ranks, else "idle"."""
    node = {"name": name, "rank": None, "address": address} | machine(facts)
    total, available = node["memory_total"], facts.get("memory_available")
    node["memory_used"] = total - int(available) if total and available is not None else None
    node |= dict.fromkeys(_RANK_FIELDS)
    node["state"] = "running" if ranks else "idle"
    node["ranks"] = sorted(ranks) if ranks is not None else None
    return node


def agent_nodes(
    nodes: Sequence[tuple[str, str | None, Mapping]], ranks: Mapping[str, list[int]] | None = None
) -> list[dict]:
    """(name, address, facts) of each agent -> the contract's nodes, with the ranks each runs
    (ranks: name -> rank numbers; None: not asked)."""
    known = ranks or {}
    return [
        agent_node(name, address, facts, known.get(name, [] if ranks is not None else None))
        for name, address, facts in nodes
    ]


def ports_of(facts_by_name: Mapping[str, Mapping]) -> dict[str, list[ThunderboltPort]]:
    """Each node's Thunderbolt ports from its facts."""
    return {
        name: [ThunderboltPort.from_dict(p) for p in facts.get("thunderbolt", [])]
        for name, facts in facts_by_name.items()
    }


def _rates(speed: str) -> tuple[float | None, float | None]:
    """(negotiated Gb/s, capable Gb/s) of a port's speed text: system_profiler gives the rate
    a cable runs at ("80 Gb/s") and, on an idle receptacle, what it could ("Up to 120 Gb/s")."""
    m = _RATE.search(speed or "")
    if not m:
        return None, None
    rate = float(m.group(1))
    return (None, rate) if speed.strip().lower().startswith("up to") else (rate, None)


def generation(speeds: Sequence[str]) -> str | None:
    """A cable's Thunderbolt generation from its ends' speed texts: the slower negotiated rate
    (either end's; else the slower end's capability). 80 Gb/s and more (120 with Bandwidth
    Boost) is Thunderbolt 5; 40 Gb/s Thunderbolt 4 (Thunderbolt 3 runs at 40 Gb/s too, and the
    speed cannot tell them apart; every Apple Silicon Mac has 4 or 5); else the rate itself."""
    negotiated, capable = [], []
    for speed in speeds:
        now, could = _rates(speed)
        if now is not None:
            negotiated.append(now)
        if could is not None:
            capable.append(could)
    rates = negotiated or capable
    if not rates:
        return None
    rate = min(rates)
    if rate >= 80:
        return "Thunderbolt 5"
    if rate >= 40:
        return "Thunderbolt 4"
    return f"{rate:g} Gb/s"


def _speed(ports: Sequence[ThunderboltPort], iface: str) -> str:
    return next((p.speed for p in ports if p.interface == iface), "")


def _rdma(facts: Mapping, iface: str) -> bool:
    """Whether the port behind iface has its RDMA device (macOS names it rdma_<iface>)."""
    return f"rdma_{iface}" in (facts.get("rdma_devices") or [])


def cables(
    ports: Mapping[str, list[ThunderboltPort]], facts: Mapping[str, Mapping] | None = None
) -> list[dict]:
    """The contract's cables between the nodes (launcher/topology.py's cable graph), each with
    its generation and whether RDMA runs on it: both ends' ports have their RDMA device."""
    facts = facts or {}
    out = []
    for link in cable_graph(ports):
        speeds = [
            _speed(ports[link.a_host], link.a_iface),
            _speed(ports[link.b_host], link.b_iface),
        ]
        rdma = _rdma(facts.get(link.a_host, {}), link.a_iface) and _rdma(
            facts.get(link.b_host, {}), link.b_iface
        )
        out.append(
            {"a": link.a_host, "b": link.b_host, "generation": generation(speeds), "rdma": rdma}
        )
    return out


def ring(names: Sequence[str], links: Sequence[Link]) -> list[str]:
    """A ring through the nodes along the cables (topology.ring_order), else the names as
    given."""
    return ring_order(names, links) or list(names)


def plan(
    mode: str,
    split: Sequence[int] | None,
    backend: str | None,
    predicted_tps: float | None,
    link: str | None,
) -> dict:
    """The contract's plan. backend: MLX's (jaccl-ring is jaccl over a ring of cables); split:
    layers per rank, a pipeline's only (the other modes run every layer on every rank)."""
    return {
        "parallel": mode,
        "backend": "jaccl" if backend and backend.startswith("jaccl") else backend,
        "split": list(split) if split and mode == "pipeline" else None,
        "predicted_tps": None if predicted_tps is None else round(float(predicted_tps), 2),
        "link": link,
    }


def launch_view(
    nodes: Sequence[tuple[str, str | None, Mapping]],
    mode: str,
    split: Sequence[int] | None,
    backend: str | None,
    predicted_tps: float | None = None,
    link: str | None = None,
) -> dict:
    """The view rank 0 is given (RankSpec.view): the nodes in rank order, each "loading" with
    its rank until the ranks' own figures replace it, the cables between them, the ring (the
    ranks' order) and the plan."""
    facts = {name: f for name, _, f in nodes}
    view_nodes = []
    for rank, node in enumerate(agent_nodes(nodes)):
        view_nodes.append(node | {"rank": rank, "state": "loading", "ranks": None})
    return {
        "nodes": view_nodes,
        "cables": cables(ports_of(facts), facts),
        "ring": [name for name, _, _ in nodes],
        "plan": plan(mode, split, backend, predicted_tps, link),
    }


def local_view(
    facts: Mapping,
    mode: str,
    split: Sequence[int] | None,
    predicted_tps: float | None = None,
) -> dict:
    """The view of ranks on one machine: no nodes of its own (every rank reports this machine's
    name), the machine's figures for every rank, and the plan over loopback."""
    return {
        "nodes": [],
        "cables": [],
        "ring": [],
        "machine": machine(facts),
        "plan": plan(mode, split, "ring", predicted_tps, "loopback"),
    }


def view_text(view: Mapping) -> str | None:
    """The view as RankSpec.view's JSON text; None when it would pass MAX_VIEW_BYTES (the
    dashboard then shows the ranks' own figures only)."""
    text = json.dumps(view, separators=(",", ":"))
    if len(text.encode()) <= MAX_VIEW_BYTES:
        return text
    lean = dict(view) | {"cables": []}  # the cables first: the nodes matter more
    text = json.dumps(lean, separators=(",", ":"))
    return text if len(text.encode()) <= MAX_VIEW_BYTES else None
