"""The user's side of `mlxdist plan`: which node holds which layers, as a table or JSON."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from launcher.hosts import read_hosts
from launcher.planner import (
    DEFAULT_HEADROOM,
    GIB,
    NodeSpec,
    Plan,
    model_spec_from_folder,
    parse_simulate,
    plan,
    plan_to_json,
)
from quantize.checkpoint import CheckpointError


def nodes_from_hosts(path: str | Path) -> list[NodeSpec]:
    """Nodes in rank order from a hosts.toml, each with its memory_gb (GB as Apple sells them)."""
    nodes = []
    for h in read_hosts(path).hosts:
        if h.memory_gb is None:
            raise ValueError(
                f"host {h.name} has no memory_gb in {path}: until mlxdist agents report memory, "
                "planning needs it, e.g. memory_gb = 192"
            )
        nodes.append(NodeSpec(h.name, int(h.memory_gb * GIB)))
    return nodes


def plan_command(
    model: str,
    hosts: str | None,
    simulate: str | None,
    context: int,
    batch: int,
    bits: int,
    as_json: bool,
) -> int:
    """Prints the plan; 0 when the model fits, 1 when it does not. Faults raise ValueError."""
    if (hosts is None) == (simulate is None):
        raise ValueError("give exactly one of --hosts FILE and --simulate, e.g. --simulate 6x192GB")
    nodes = nodes_from_hosts(hosts) if hosts is not None else parse_simulate(simulate)
    try:
        spec = model_spec_from_folder(model, bits=bits)
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    result = plan(nodes, spec, context=context, batch=batch)
    if as_json:
        print(json.dumps(plan_to_json(result), indent=2))
    else:
        console = Console()
        if not console.is_terminal:
            console.width = 100  # a pipe or a log: no terminal to fit
        print_plan(result, console)
    return 0 if result.fits else 1


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f}"


def print_plan(p: Plan, console: Console) -> None:
    table = Table(
        title=f"{p.model}: {sum(p.split)} layers, {p.context} tokens of context x {p.batch}",
        show_edge=False,
        pad_edge=False,
        caption=f"GB = 10^9 bytes; memory is what each node has less "
        f"{DEFAULT_HEADROOM:.0%} headroom for macOS and other apps",
    )
    columns = ("rank", "node", "layers", "weights GB", "KV GB", "total GB", "memory GB", "free GB")
    for col in columns:
        if col == "node":
            table.add_column(col, overflow="fold")
        else:
            table.add_column(col, justify="right", no_wrap=True)
    for row in p.nodes:
        table.add_row(
            str(row.rank),
            row.name,
            str(row.layers),
            _gb(row.weights_bytes),
            f"{row.kv_bytes / 1e9:.2f}",  # small at short contexts: 0.0 would read as none
            _gb(row.total_bytes),
            _gb(row.usable_bytes),
            _gb(row.free_bytes),
            style=None if row.free_bytes >= 0 else "red",
        )
    console.print(table)
    line = f"split {','.join(map(str, p.split))}: {p.message}"
    console.print(line, style=None if p.fits else "red", soft_wrap=True, highlight=False)
