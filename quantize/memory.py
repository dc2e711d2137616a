"""This process's resident memory, as the memory bounds in tests and reports measure it."""

from __future__ import annotations

import resource
import sys


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """Peak resident memory of this process image.

    On Linux, VmHWM: getrusage's ru_maxrss survives exec, so a child forked from a large parent
    would report the parent's size as its own peak.
    """
    hwm = _status("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_now() -> int:
    """Resident memory now; where unknown, the peak so far (which only overstates growth)."""
    now = _status("VmRSS")
    return now if now is not None else peak_rss()
