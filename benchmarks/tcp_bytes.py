"""Bytes a process has sent over TCP, from the kernel's per-socket counters (`ss -tinp`).

The same measurement for mlx-lm's ranks and mlxdist's: payload bytes handed to TCP, whatever
library sent them. Sockets on excluded local ports (an HTTP server's) are left out.
"""

from __future__ import annotations

import re
import subprocess

_OWNER = re.compile(r"pid=(\d+),")
_SENT = re.compile(r"\bbytes_sent:(\d+)")


def tcp_bytes_sent(pid: int, exclude_ports: tuple[int, ...] = ()) -> int:
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, check=True).stdout
    total, owner, port = 0, None, None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):  # a socket's first line: addresses and owners
            owners = [int(p) for p in _OWNER.findall(line)]
            owner = pid if pid in owners else None
            fields = line.split()
            port = int(fields[3].rsplit(":", 1)[1]) if len(fields) > 3 else None
        elif owner is not None and port not in exclude_ports:
            m = _SENT.search(line)
            total += int(m.group(1)) if m else 0
    return total
