"""Apple Silicon chips as Apple's pages state them: memory bandwidth and Thunderbolt generation.
A leaf both the planner (names in --simulate) and the performance model read."""

from __future__ import annotations

import re
from dataclasses import dataclass

GB = 10**9


@dataclass(frozen=True)
class ChipSpec:
    name: str
    bandwidth: float  # peak unified-memory bandwidth, bytes/s
    thunderbolt: int  # 4 or 5: RDMA (JACCL) needs Thunderbolt 5 at both ends


# Peak memory bandwidth as Apple's product and tech-spec pages state it (Mac Studio, Mac mini,
# MacBook Pro; the M3 Max with the 30-core GPU is the binned part, the M4 Max with the 32-core GPU
# likewise). Thunderbolt generation from the same pages.
CHIPS: dict[str, ChipSpec] = {
    c.name: c
    for c in (
        ChipSpec("M1 Ultra", 800 * GB, 4),
        ChipSpec("M2 Ultra", 800 * GB, 4),
        ChipSpec("M3 Ultra", 819 * GB, 5),
        ChipSpec("M1 Max", 400 * GB, 4),
        ChipSpec("M2 Max", 400 * GB, 4),
        ChipSpec("M3 Max", 400 * GB, 4),
        ChipSpec("M3 Max 30c", 300 * GB, 4),
        ChipSpec("M4 Max", 546 * GB, 5),
        ChipSpec("M4 Max 32c", 410 * GB, 5),
        ChipSpec("M4 Pro", 273 * GB, 5),
    )
}
DEFAULT_CHIP = "M2 Ultra"  # an unnamed node up to 192 GB (the Mac Studio this project targets)
DEFAULT_BIG_CHIP = "M3 Ultra"  # an unnamed node above 192 GB: only the M3 Ultra has more


def chip(name: str | ChipSpec) -> ChipSpec:
    """A chip by name, spelt as on Apple's pages or squashed: "M3 Ultra", "m3ultra", "M3Ultra"."""
    if isinstance(name, ChipSpec):
        return name
    key = _squash(name)
    for c in CHIPS.values():
        if _squash(c.name) == key:
            return c
    raise ValueError(f"unknown chip {name!r}: use one of {', '.join(CHIPS)}")


def chip_of_node_name(name: str) -> ChipSpec | None:
    """The chip a --simulate name such as "m3ultra" or "M4Pro" spells, if any."""
    try:
        return chip(name)
    except ValueError:
        return None


def default_chip(memory_bytes: int) -> ChipSpec:
    """For a node known only by its memory: M2 Ultra up to 192 GB, M3 Ultra above."""
    return CHIPS[DEFAULT_BIG_CHIP if memory_bytes > 192 * 2**30 else DEFAULT_CHIP]


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())
