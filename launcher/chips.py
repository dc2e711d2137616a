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
# likewise; the Pro and plain chips as in the MacBook Pro, Mac mini and iMac). Thunderbolt
# generation from the same pages.
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
        ChipSpec("M1 Pro", 200 * GB, 4),
        ChipSpec("M2 Pro", 200 * GB, 4),
        ChipSpec("M3 Pro", 150 * GB, 4),
        ChipSpec("M1", 68.25 * GB, 4),
        ChipSpec("M2", 100 * GB, 4),
        ChipSpec("M3", 100 * GB, 4),
        ChipSpec("M4", 120 * GB, 4),
    )
}
DEFAULT_CHIP = "M2 Ultra"  # an unnamed node up to 192 GB (the Mac Studio this project targets)
DEFAULT_BIG_CHIP = "M3 Ultra"  # an unnamed node above 192 GB: only the M3 Ultra has more


def chip(name: str | ChipSpec) -> ChipSpec:
    """A chip by name, spelt as on Apple's pages, as `sysctl machdep.cpu.brand_string` gives it
    ("Apple M3 Ultra") or squashed: "M3 Ultra", "apple  m3 ultra", "m3ultra", "M3Ultra"."""
    if isinstance(name, ChipSpec):
        return name
    key = _squash(name).removeprefix("apple")
    for c in CHIPS.values():
        if _squash(c.name) == key:
            return c
    raise ValueError(f"unknown chip {name!r}: use one of {', '.join(CHIPS)}")


def chip_of_node_name(name: str) -> ChipSpec | None:
    """The chip a --simulate name such as "m3ultra" or "M4Pro" (or a brand string such as
    "Apple M3 Ultra") spells, if any."""
    try:
        return chip(name)
    except ValueError:
        return None


def reported_chip(brand: str) -> tuple[str | None, str | None]:
    """A node's reported chip (its brand string) as (the table's name, a note when unknown).
    An empty brand says nothing, so it gets no note; any other name not in the table is noted,
    never dropped silently."""
    if not brand.strip():
        return None, None
    known = chip_of_node_name(brand)
    if known is not None:
        return known.name, None
    return None, f"chip {brand.strip()!r} is not in launcher/chips.py"


def default_chip(memory_bytes: int) -> ChipSpec:
    """For a node known only by its memory: M2 Ultra up to 192 GB, M3 Ultra above."""
    return CHIPS[DEFAULT_BIG_CHIP if memory_bytes > 192 * 2**30 else DEFAULT_CHIP]


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())
