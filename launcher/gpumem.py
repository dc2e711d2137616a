"""How much memory Metal lets a Mac's GPU hold: the limit a plan must stay under.

Metal keeps GPU-wired memory under the device's recommended working set
(`recommendedMaxWorkingSetSize`, MLX's `max_recommended_working_set_size`) unless
`sudo sysctl iogpu.wired_limit_mb=N` raises it; the working set then reports the new limit. A
node's limit, in order of trust: the wired limit in force (iogpu.wired_limit_mb, 0 = not set),
else the working set Metal reports, else an estimate from the installed memory.

The estimate, fitted on the figures in tests/data/gpu/working_set.json: 2/3 of the memory below
64 GiB, 3/4 from 64 GiB. It is exact for every figure from macOS before 26 (16, 32, 64 and 96 GiB)
and below the larger ones reported since (128 GiB on macOS 26 gives 84%, a 256 GiB M3 Ultra about
93%): a plan made on it fits on either. Where no figure is known (36 or 48 GiB), the lower
fraction is taken, for the same reason.
"""

from __future__ import annotations

MIB = 2**20
GIB = 2**30
_LARGE = 64 * GIB  # from here Metal's working set is 3/4 of the memory, below it 2/3
WIRED = "iogpu.wired_limit_mb"
METAL = "Metal"
ESTIMATE = "estimate"


def estimated_working_set(memory_total: int) -> int:
    """Metal's recommended working set for a Mac with this much memory (bytes), as estimated."""
    if memory_total <= 0:
        return 0
    return memory_total * 3 // 4 if memory_total >= _LARGE else memory_total * 2 // 3


def gpu_limit(memory_total: int, wired_limit_mb: int = 0, working_set: int = 0) -> tuple[int, str]:
    """(the GPU memory limit in bytes, where it comes from: WIRED, METAL or ESTIMATE)."""
    if wired_limit_mb > 0:
        return wired_limit_mb * MIB, WIRED
    if working_set > 0:
        return working_set, METAL
    return estimated_working_set(memory_total), ESTIMATE


def wired_limit_mb_to_fit(memory_total: int, headroom: int) -> int:
    """The iogpu.wired_limit_mb that lets the GPU use all but `headroom` bytes (what the planner
    leaves macOS and other apps): a plan that fits the memory less the headroom then fits."""
    return max(0, (memory_total - headroom) // MIB)


def sysctl_command(mb: int) -> str:
    """The command that raises the limit until the next restart."""
    return f"sudo sysctl {WIRED}={mb}"
