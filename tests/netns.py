"""Linux network namespaces as stand-in Macs: each host its own namespace with a link-local
169.254.x.y address on one Ethernet bridge, as Macs on a Thunderbolt bridge. Root only; every
namespace, and every process in one, is removed on exit even when a test fails. Linux only:
`available()` says why not elsewhere, and the tests that need namespaces skip with that reason."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Host:
    name: str  # the namespace
    ip: str

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def available() -> str | None:
    """None when namespaces can be made here; else why not."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "network namespaces need the ip command (iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"mxprobe{os.getpid() % 100000}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return done.stderr.strip() or "ip netns add failed"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def pids_in(namespace: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()]


@contextlib.contextmanager
def bridged_hosts(n: int, subnet: str = "169.254.100"):
    tag = f"mx{os.getpid() % 10000}"
    switch = f"{tag}sw"
    hosts = [Host(f"{tag}h{i}", f"{subnet}.{i + 1}") for i in range(n)]
    made: list[str] = []
    try:
        _ip("netns", "add", switch)
        made.append(switch)
        sw = ["-n", switch]
        _ip(*sw, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip(*sw, "link", "set", "br0", "up")
        for i, h in enumerate(hosts):
            _ip("netns", "add", h.name)
            made.append(h.name)
            a, b = f"{tag}v{i}a", f"{tag}v{i}b"
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            _ip("link", "set", a, "netns", h.name)
            _ip("link", "set", b, "netns", switch)
            _ip(*sw, "link", "set", b, "master", "br0")
            _ip(*sw, "link", "set", b, "up")
            hn = ["-n", h.name]
            _ip(*hn, "link", "set", a, "name", "eth0")
            _ip(*hn, "addr", "add", f"{h.ip}/16", "dev", "eth0")
            _ip(*hn, "link", "set", "eth0", "multicast", "on")
            _ip(*hn, "link", "set", "eth0", "up")
            _ip(*hn, "link", "set", "lo", "up")
        yield hosts
    finally:
        for name in reversed(made):
            for pid in pids_in(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def cable(a: Host, b: Host, index: int, addressed: bool = True) -> tuple[str, str]:
    """A point-to-point link between two hosts, as a Thunderbolt cable: veth ends named
    tb<index>a / tb<index>b with a /30 of their own (192.168.200.4*index + 1 and + 2).
    Returns the two interface names."""
    ia, ib = f"tb{index}a", f"tb{index}b"
    _ip("link", "add", ia, "netns", a.name, "type", "veth", "peer", "name", ib, "netns", b.name)
    for host, iface, last in ((a, ia, 1), (b, ib, 2)):
        if addressed:
            _ip("-n", host.name, "addr", "add", f"192.168.200.{4 * index + last}/30", "dev", iface)
        _ip("-n", host.name, "link", "set", iface, "up")
    return ia, ib
