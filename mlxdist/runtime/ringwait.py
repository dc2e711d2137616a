"""Wait for the ring without spinning.

MLX's ring backend polls its sockets while a receive is posted: a rank waiting for its next
step keeps a core at 100% (measured: an idle rank 1 of 2 used one whole core). On a machine with
few cores that steals time from the ranks that are working. So before a receive that may wait,
a rank blocks in select() until one of its ring sockets has data; MLX's receive then finds the
bytes there. The ring sockets are told apart from the HTTP and heartbeat ones by the hostfile's
addresses.
"""

from __future__ import annotations

import json
import os
import select
import socket
import stat
from pathlib import Path

_DIRS = ("/dev/fd", "/proc/self/fd")


def _hostfile_addresses() -> set[tuple[str, int]]:
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return set()
    try:
        hosts = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return set()
    out = set()
    for entry in hosts:
        for address in entry if isinstance(entry, list) else [entry]:
            host, _, port = str(address).rpartition(":")
            if port.isdigit():
                out.add((host, int(port)))
    return out


def ring_sockets() -> list[socket.socket]:
    """This process's TCP sockets whose local or peer address is in the ring's hostfile."""
    ring = _hostfile_addresses()
    if not ring:
        return []
    found = []
    for d in _DIRS:
        try:
            fds = [int(f) for f in os.listdir(d)]
            break
        except OSError:
            continue
    else:
        return []
    for fd in fds:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            ends = {s.getsockname()[:2], s.getpeername()[:2]}
        except OSError:
            s.close()
            continue
        if s.type == socket.SOCK_STREAM and ends & ring:
            found.append(s)
        else:
            s.close()
    return found


class RingWaiter:
    def __init__(self) -> None:
        self.sockets = ring_sockets()

    def wait(self) -> None:
        """Returns once a ring socket has bytes to read (at once when none was found)."""
        if self.sockets:
            select.select(self.sockets, [], [])
