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


def mlx_launch_hostfile(hosts: list[tuple[str, list[str]]], backend: str = "ring") -> str:
    """The hostfile mlx.launch reads: [(ssh destination, [ips])] in rank order."""
    entries = [{"ssh": ssh, "ips": ips, "rdma": []} for ssh, ips in hosts]
    return json.dumps({"backend": backend, "envs": [], "hosts": entries}, indent=2)
