"""Which MLX backend the ranks talk over: ring (TCP, any network), jaccl (RDMA over
Thunderbolt 5 on a full mesh) or jaccl-ring (RDMA over a ring of cables), and the N x N matrix
of RDMA devices their hostfile lists.

Plain JACCL connects every pair of ranks directly, so every pair of Macs must share a cable;
jaccl-ring (MLX_JACCL_RING=1) talks to its two ring neighbours only, so each rank must be cabled
to the next. Each cable used needs Thunderbolt 5 and an `rdma_<iface>` device (RDMA enabled in
macOS Recovery) at both ends, and no Thunderbolt Bridge over it. Pure functions over the nodes'
facts (as their agents report them) and the cables.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from quantize.errors import UserError

from .chips import chip_of_node_name
from .topology import Link, bridge_commands, ring_order

CHOICES = ("ring", "jaccl", "jaccl-ring", "auto")
RDMA_BACKENDS = ("jaccl", "jaccl-ring")
RDMA_SETUP = "rdma_ctl enable  # in macOS Recovery (Options > Utilities > Terminal), then restart"
_SPEED = re.compile(r"(\d+)\s*Gb/s")

Facts = Mapping[str, Mapping]  # node name -> its facts (HostFacts.to_dict()), in rank order
Rdma = list[list["str | list[str] | None"]]


class BackendError(UserError):
    """jaccl or jaccl-ring was asked for but cannot run; setup holds the commands to print per
    host."""

    def __init__(self, message: str, setup: dict[str, list[str]] | None = None):
        super().__init__(message)
        self.setup = setup or {}


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # "ring", "jaccl" or "jaccl-ring"
    why: str  # one line
    rdma: Rdma | None = None  # jaccl, jaccl-ring: the device matrix, rank by rank
    setup: dict[str, list[str]] = field(default_factory=dict)  # what would make RDMA possible


def device(iface: str) -> str:
    """The RDMA device macOS names after a Thunderbolt interface (as mlx.distributed_config)."""
    return f"rdma_{iface}"


def pair_cables(order: Sequence[str], links: Sequence[Link], i: int, j: int) -> list[Link]:
    """The cables between ranks i and j, in the order mlx.distributed_config numbers them: by
    the interface name on the lower rank's side, so the k-th cable is the same on both sides."""
    low = order[min(i, j)]
    between = [link for link in links if link.joins(order[i], order[j])]
    return sorted(between, key=lambda link: link.iface(low))


def rdma_matrix(order: Sequence[str], links: Sequence[Link]) -> Rdma:
    """rdma[i][j]: rank i's device on its cable to rank j (None on the diagonal); a list, one per
    cable, when every pair has more than one (as many for each pair: the fewest any pair has)."""
    n = len(order)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    count = min((len(pair_cables(order, links, i, j)) for i, j in pairs), default=0)
    if pairs and count == 0:
        raise ValueError("jaccl needs a cable between every pair of nodes")
    matrix: Rdma = []
    for i in range(n):
        row: list[str | list[str] | None] = []
        for j in range(n):
            if i == j:
                row.append(None)
                continue
            names = [device(c.iface(order[i])) for c in pair_cables(order, links, i, j)[:count]]
            row.append(names[0] if count == 1 else names)
        matrix.append(row)
    return matrix


def neighbours(i: int, n: int) -> tuple[int, int]:
    """The ranks before and after rank i on a ring of n (the same rank twice when n is 2)."""
    return (i - 1) % n, (i + 1) % n


def rdma_ring_matrix(order: Sequence[str], links: Sequence[Link]) -> Rdma:
    """The jaccl-ring matrix (as mlx.distributed_config writes it): rdma[i][j] is rank i's
    device on its cable to j when j is a ring neighbour, else None; a list, one per cable, when
    every neighbour pair has more than one (as many for each: the fewest any has)."""
    n = len(order)
    count = min((len(pair_cables(order, links, i, (i + 1) % n)) for i in range(n)), default=0)
    if n > 1 and count == 0:
        raise ValueError("jaccl-ring needs a cable between each rank and the next")
    matrix: Rdma = []
    for i in range(n):
        row: list[str | list[str] | None] = []
        for j in range(n):
            if i == j or j not in neighbours(i, n):
                row.append(None)
                continue
            names = [device(c.iface(order[i])) for c in pair_cables(order, links, i, j)[:count]]
            row.append(names[0] if count == 1 else names)
        matrix.append(row)
    return matrix


def thunderbolt_generation(facts: Mapping, iface: str) -> int | None:
    """5 or 4 for the port behind iface: from its bus speed when the facts carry it (80 or 120
    Gb/s is Thunderbolt 5), else from the chip; None when neither tells."""
    for port in facts.get("thunderbolt", []):
        if port.get("interface") == iface and (m := _SPEED.search(str(port.get("speed", "")))):
            return 5 if int(m.group(1)) >= 80 else 4
    name = str(facts.get("chip", "")).removeprefix("Apple ").strip()
    spec = chip_of_node_name(name) if name else None
    return spec.thunderbolt if spec else None


def _pairs(order: Sequence[str], backend: str) -> list[tuple[int, int]]:
    """The rank pairs (i < j) a backend sends between: every pair, or ring neighbours."""
    n = len(order)
    if backend == "jaccl":
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    return sorted({tuple(sorted((i, (i + 1) % n))) for i in range(n)})


def _missing(order: Sequence[str], links: Sequence[Link], backend: str) -> list[tuple[str, str]]:
    """The pairs the backend sends between that share no cable."""
    return [
        (order[i], order[j])
        for i, j in _pairs(order, backend)
        if not any(link.joins(order[i], order[j]) for link in links)
    ]


def _gap(order: Sequence[str], links: Sequence[Link], backend: str) -> str:
    """Why the cables do not join the pairs the backend needs ("" when they do)."""
    missing = _missing(order, links, backend)
    if not missing:
        return ""
    (a, b), more = missing[0], len(missing) - 1
    others = f" (and {more} more pair{'s' if more > 1 else ''})" if more else ""
    if backend == "jaccl":
        return f"jaccl needs every pair of Macs cabled, and {a} and {b} are not{others}"
    return f"jaccl-ring needs each rank cabled to the next, and {a} and {b} are not{others}"


def _no_shape(order: Sequence[str], links: Sequence[Link]) -> str:
    """Why the cables carry neither JACCL backend, in the ranks' order."""
    a, b = _missing(order, links, "jaccl-ring")[0]
    line = f"the cables form neither a full mesh nor a ring in rank order ({a} and {b} are "
    line += "neighbours but not cabled)"
    if ring_order(order, links):
        line += "; list the hosts in the order of the cables' ring"
    return line


def _problems(
    order: Sequence[str], facts: Facts, links: Sequence[Link], backend: str
) -> tuple[str, dict[str, list[str]]]:
    """Why backend (jaccl or jaccl-ring) cannot run here ("" when it can), and the commands per
    host that would fix what a person can fix."""
    if not links:
        return "the nodes report no Thunderbolt cables between them", {}
    gap = _gap(order, links, backend)
    if gap:
        return gap, {}
    used = [c for i, j in _pairs(order, backend) for c in pair_cables(order, links, i, j)]
    setup: dict[str, list[str]] = {}
    reasons: list[str] = []
    for cable in used:
        for host in (cable.a_host, cable.b_host):
            iface = cable.iface(host)
            gen = thunderbolt_generation(facts.get(host, {}), iface)
            if gen != 5:
                what = "Thunderbolt 4" if gen == 4 else "no known Thunderbolt generation"
                reasons.append(f"{host} {iface} has {what}; RDMA needs Thunderbolt 5 at both ends")
            elif device(iface) not in facts.get(host, {}).get("rdma_devices", []):
                reasons.append(
                    f"{host} has no RDMA device {device(iface)} (enable RDMA in recovery mode: "
                    "rdma_ctl enable)"
                )
                setup.setdefault(host, [RDMA_SETUP])
    for host in order:
        bridges = facts.get(host, {}).get("bridges") or {}
        # In the ring setup's order (the cables sorted), so both print the same lines.
        cabled = [c.iface(host) for c in sorted(used) if host in (c.a_host, c.b_host)]
        bridged = [(i, b) for i in cabled for b, members in sorted(bridges.items()) if i in members]
        if bridged:
            iface, bridge = bridged[0]
            reasons.append(
                f"{host} {iface} is still in {bridge}, and a bridge over the cables loops "
                "traffic round the Macs; take the cabled ports out (the commands are printed)"
            )
            setup.setdefault(host, []).extend(bridge_commands(cabled, bridges))
    return (reasons[0] if reasons else ""), setup


def _chosen(order: Sequence[str], links: Sequence[Link], backend: str, why: str) -> BackendChoice:
    matrix = rdma_matrix(order, links) if backend == "jaccl" else rdma_ring_matrix(order, links)
    return BackendChoice(backend, why, matrix)


def choose_backend(
    order: Sequence[str], facts: Facts, links: Sequence[Link], asked: str = "auto"
) -> BackendChoice:
    """The backend for these nodes (rank order) and cables, with one line saying why.

    auto: jaccl when every pair is cabled over Thunderbolt 5 with an RDMA device at both ends
    and no bridge, else jaccl-ring when each rank's cables to the next are, else ring. jaccl or
    jaccl-ring asked but impossible: BackendError naming what is missing.
    """
    if asked not in CHOICES:
        raise BackendError(f"--backend must be one of {', '.join(CHOICES)}, not {asked!r}")
    if asked == "ring":
        return BackendChoice("ring", "ring: asked for")
    if len(order) < 2:
        return BackendChoice("ring", "ring: one node, nothing to send between hosts")
    n = len(order)
    mesh, mesh_setup = _problems(order, facts, links, "jaccl")
    if not mesh and asked in ("auto", "jaccl"):
        why = f"jaccl: every pair of the {n} nodes is cabled over Thunderbolt 5 with RDMA"
        return _chosen(order, links, "jaccl", why)
    ring, ring_setup = _problems(order, facts, links, "jaccl-ring")
    if not ring and asked in ("auto", "jaccl-ring"):
        why = f"jaccl-ring: each of the {n} nodes is cabled to the next over Thunderbolt 5 "
        why += "with RDMA" + (f"; not jaccl, as {mesh}" if mesh else "")
        return _chosen(order, links, "jaccl-ring", why)
    if asked != "auto":
        reason, setup = (mesh, mesh_setup) if asked == "jaccl" else (ring, ring_setup)
        hint = " (jaccl-ring can run over this ring: --backend jaccl-ring)" if not ring else ""
        todo = " (run the commands printed above on each Mac, then launch again)" if setup else ""
        raise BackendError(f"cannot use {asked}: {reason}{todo}{hint}", setup)
    if links and _gap(order, links, "jaccl") and _gap(order, links, "jaccl-ring"):
        return BackendChoice("ring", f"ring: {_no_shape(order, links)}")
    # The problem of the richest cabling there is: the mesh's, else the ring's.
    reason, setup = (ring, ring_setup) if _gap(order, links, "jaccl") else (mesh, mesh_setup)
    return BackendChoice("ring", f"ring: {reason}", None, setup)
