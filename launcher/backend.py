"""Which MLX backend the ranks talk over: ring (TCP, any network) or jaccl (RDMA over
Thunderbolt 5), and the N x N matrix of RDMA devices a jaccl hostfile lists.

Plain JACCL connects every pair of ranks directly, so every pair of Macs must share a cable;
each cable needs Thunderbolt 5 and an `rdma_<iface>` device (RDMA enabled in macOS Recovery) at
both ends. Pure functions over the nodes' facts (as their agents report them) and the cables.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from quantize.errors import UserError

from .chips import chip_of_node_name
from .topology import DISABLE_BRIDGE as BRIDGE_OFF
from .topology import Link

CHOICES = ("ring", "jaccl", "auto")
RDMA_SETUP = "rdma_ctl enable  # in macOS Recovery (Options > Utilities > Terminal), then restart"
_SPEED = re.compile(r"(\d+)\s*Gb/s")

Facts = Mapping[str, Mapping]  # node name -> its facts (HostFacts.to_dict()), in rank order
Rdma = list[list["str | list[str] | None"]]


class BackendError(UserError):
    """jaccl was asked for but cannot run; setup holds the commands to print per host."""

    def __init__(self, message: str, setup: dict[str, list[str]] | None = None):
        super().__init__(message)
        self.setup = setup or {}


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # "ring" or "jaccl"
    why: str  # one line
    rdma: Rdma | None = None  # jaccl: the device matrix, rank by rank
    setup: dict[str, list[str]] = field(default_factory=dict)  # what would make jaccl possible


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


def thunderbolt_generation(facts: Mapping, iface: str) -> int | None:
    """5 or 4 for the port behind iface: from its bus speed when the facts carry it (80 or 120
    Gb/s is Thunderbolt 5), else from the chip; None when neither tells."""
    for port in facts.get("thunderbolt", []):
        if port.get("interface") == iface and (m := _SPEED.search(str(port.get("speed", "")))):
            return 5 if int(m.group(1)) >= 80 else 4
    name = str(facts.get("chip", "")).removeprefix("Apple ").strip()
    spec = chip_of_node_name(name) if name else None
    return spec.thunderbolt if spec else None


def _missing_pairs(order: Sequence[str], links: Sequence[Link]) -> list[tuple[str, str]]:
    n = len(order)
    return [
        (order[i], order[j])
        for i in range(n)
        for j in range(i + 1, n)
        if not any(link.joins(order[i], order[j]) for link in links)
    ]


def _problems(order: Sequence[str], facts: Facts, links: Sequence[Link]) -> tuple[str, dict]:
    """Why jaccl cannot run here ("" when it can), and the setup commands per host."""
    if not links:
        return "the nodes report no Thunderbolt cables between them", {}
    missing = _missing_pairs(order, links)
    if missing:
        a, b = missing[0]
        shape = "a ring" if len(missing) < len(order) * (len(order) - 1) // 2 else "no mesh"
        more = f" (and {len(missing) - 1} more pairs)" if len(missing) > 1 else ""
        return (
            f"the cables form {shape}, not a full mesh: jaccl needs every pair of Macs cabled, "
            f"and {a} and {b} are not{more}",
            {},
        )
    setup: dict[str, list[str]] = {}
    reasons: list[str] = []
    used = [
        c
        for i in range(len(order))
        for j in range(i + 1, len(order))
        for c in pair_cables(order, links, i, j)
    ]
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
        members = {m for ms in facts.get(host, {}).get("bridges", {}).values() for m in ms}
        if members & {c.iface(host) for c in used if host in (c.a_host, c.b_host)}:
            setup.setdefault(host, []).append(BRIDGE_OFF)
    return (reasons[0] if reasons else ""), setup


def choose_backend(
    order: Sequence[str], facts: Facts, links: Sequence[Link], asked: str = "auto"
) -> BackendChoice:
    """The backend for these nodes (rank order) and cables, with one line saying why.

    auto: jaccl when every pair is cabled over Thunderbolt 5 with an RDMA device at both ends,
    else ring. jaccl asked but impossible: BackendError naming what is missing.
    """
    if asked not in CHOICES:
        raise BackendError(f"--backend must be one of {', '.join(CHOICES)}, not {asked!r}")
    if asked == "ring":
        return BackendChoice("ring", "ring: asked for")
    if len(order) < 2:
        return BackendChoice("ring", "ring: one node, nothing to send between hosts")
    reason, setup = _problems(order, facts, links)
    if not reason:
        why = f"jaccl: every pair of the {len(order)} nodes is cabled over Thunderbolt 5 with RDMA"
        return BackendChoice("jaccl", why, rdma_matrix(order, links), setup)
    if asked == "jaccl":
        todo = " (run the commands printed above on each Mac, then launch again)" if setup else ""
        raise BackendError(f"cannot use jaccl: {reason}{todo}", setup)
    return BackendChoice("ring", f"ring: {reason}", None, setup)
