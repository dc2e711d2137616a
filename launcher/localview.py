"""This machine's figures, read cheaply (for the view below, and for an agent's live memory),
and the view rank 0's dashboard is given when every rank runs on this machine: the machine's
chip and memory, and the plan with the performance model's speed for the mode run (as
--parallel auto predicts it for N ranks sharing this machine)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from quantize.errors import UserError

from .clusterview import local_view, view_text
from .hostfacts import (
    FACTS_FROM_ENV,
    MACOS_COMMANDS,
    collect,
    metal_working_set,
    parse_cpu_model,
    parse_meminfo,
    parse_sysctl,
    parse_vm_stat,
    read_text,
    run_command,
)
from .secret import config_dir


def machine_facts() -> dict:
    """This machine's chip, memory and GPU limits, read cheaply: on a Mac from sysctl and Metal
    (the Thunderbolt and display listings take seconds and say nothing a local view needs), on
    Linux from /proc; a captured Mac (MLXDIST_FACTS_FROM) as its facts give it."""
    if os.environ.get(FACTS_FROM_ENV):
        return collect(node_id_path=config_dir() / "node_id").to_dict()
    if sys.platform == "darwin":
        sysctl = parse_sysctl(run_command(MACOS_COMMANDS["sysctl.txt"]))
        wired = sysctl.get("iogpu.wired_limit_mb", "0")
        return {
            "chip": sysctl.get("machdep.cpu.brand_string", ""),
            "memory_total": int(sysctl["hw.memsize"]),
            "os": "macOS",
            "wired_limit_mb": int(wired) if wired.isdigit() else 0,
            "gpu_working_set": metal_working_set(),
        }
    total, available = parse_meminfo(read_text("/proc/meminfo"))
    chip = parse_cpu_model(read_text("/proc/cpuinfo"))
    return {"chip": chip, "memory_total": total, "memory_available": available, "os": "Linux"}


def memory_available() -> int:
    """Bytes this machine can give a new allocation now: vm_stat on a Mac, /proc/meminfo on
    Linux, a captured Mac's own figure (MLXDIST_FACTS_FROM); read every few seconds by an agent
    that a dashboard watches, so never the whole facts (system_profiler takes seconds)."""
    if os.environ.get(FACTS_FROM_ENV):
        return collect(node_id_path=config_dir() / "node_id").memory_available
    if sys.platform == "darwin":
        return parse_vm_stat(run_command(MACOS_COMMANDS["vm_stat.txt"]))
    return parse_meminfo(read_text("/proc/meminfo"))[1]


def predicted_here(model: Path, facts: dict, mode: str, ranks: int, context: int) -> float | None:
    """Decode tokens/s the performance model predicts for `ranks` ranks of `mode` on this
    machine, as --parallel auto weighs that mode; None when it cannot say (a chip it has no
    figures for, which it would take for an Apple chip of its memory)."""
    from .autoparallel import LOOPBACK, local_nodes, mode_outcome, model_inputs
    from .chips import chip_of_node_name
    from .planner import node_spec_from_facts

    if chip_of_node_name(facts.get("chip") or "") is None:
        return None

    spec, active, refusal = model_inputs(model, ranks)
    nodes = local_nodes(node_spec_from_facts("here", facts), ranks)
    outcome = mode_outcome(
        mode, nodes, spec, active, LOOPBACK, context, refusal=refusal, shared=True
    )
    return outcome.tokens_per_s


def view_here(model: Path, mode: str, split: list[int], context: int) -> str | None:
    """RankSpec.view for len(split) ranks of `mode` on this machine; None when this machine's
    figures cannot be read (the dashboard then shows the ranks' own)."""
    try:
        facts = machine_facts()
    except (UserError, OSError, ValueError, KeyError):
        return None
    try:
        predicted = predicted_here(model, facts, mode, len(split), context)
    except (UserError, OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        predicted = None
    return view_text(local_view(facts, mode, split, predicted))
