"""The MLX ring hostfile: one entry per rank, each a list of "ip:port" (what mlx.launch writes)."""

from __future__ import annotations

import json
import socket
from pathlib import Path


def ring_hostfile(addresses: list[list[str]]) -> str:
    """JSON for MLX_HOSTFILE; addresses[r] lists the "ip:port" entries rank r listens on."""
    for r, entries in enumerate(addresses):
        if not entries:
            raise ValueError(f"rank {r} has no address")
        for e in entries:
            host, _, port = e.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"rank {r}: {e!r} is not ip:port")
    return json.dumps(addresses)


def ring_entries(ips: list[list[str]], first_port: int) -> list[list[str]]:
    """Each rank's "ip:port" entries for its addresses ips[r], numbered as mlx.launch numbers
    them: one port per address, counting up from first_port over the ranks in order."""
    ports = iter(range(first_port, first_port + sum(len(x) for x in ips)))
    entries = [[f"{ip}:{next(ports)}" for ip in rank_ips] for rank_ips in ips]
    ring_hostfile(entries)  # validates
    return entries


def write_hostfile(path: Path, addresses: list[list[str]]) -> Path:
    path.write_text(ring_hostfile(addresses))
    return path


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n ports that were free a moment ago on host (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def mlx_launch_hostfile(
    hosts: list[tuple[str, list[str]]],
    backend: str = "ring",
    rdma: list[list[str | list[str] | None]] | None = None,
    envs: list[str] | None = None,
) -> str:
    """The hostfile mlx.launch reads: [(ssh destination, [ips])] in rank order.

    ips: for ring, where each rank listens; for jaccl and jaccl-ring, rank 0's first is the
    coordinator's address. rdma (jaccl, jaccl-ring): rank i's device to rank j in rdma[i][j],
    None on the diagonal (jaccl-ring: and between ranks that are not ring neighbours).
    envs: "NAME=value" set for every rank.
    """
    if rdma is not None and (
        len(rdma) != len(hosts) or any(len(row) != len(hosts) for row in rdma)
    ):
        raise ValueError(f"the RDMA matrix must be {len(hosts)} x {len(hosts)}")
    rows = rdma or [[] for _ in hosts]
    entries = [{"ssh": ssh, "ips": ips, "rdma": row} for (ssh, ips), row in zip(hosts, rows)]
    return json.dumps({"backend": backend, "envs": envs or [], "hosts": entries}, indent=2)
