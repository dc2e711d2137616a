"""`mlxdist plan`: which node holds which layers, as a table or JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from mlxdist.cli.app import app
from quantize.errors import UserError

if TYPE_CHECKING:
    from launcher.planner import ModelSpec, NodeSpec, Plan


@app.command("plan")
def plan_cmd(
    model: str = typer.Argument(..., help="model folder or a bare config.json"),
    hosts: Path | None = typer.Option(None, help="hosts.toml with each host's memory_gb"),
    simulate: str | None = typer.Option(None, help='a cluster that is not here, e.g. "6x192GB"'),
    cluster: str | None = typer.Option(None, help="the agents of this cluster, found by zeroconf"),
    interface: list[str] = typer.Option([], help="interface to discover agents on (--cluster)"),
    context: int = typer.Option(4096, min=1, help="tokens of context to hold in the KV cache"),
    batch: int = typer.Option(1, min=1, help="sequences decoded at once"),
    bits: int = typer.Option(4, help="width planned for a model not yet quantised"),
    as_json: bool = typer.Option(False, "--json", help="the plan as JSON (for quantize --plan)"),
    link: str = typer.Option("tb5", help="link for the prediction: tb5, tb4 or rdma"),
    parallel: str = typer.Option(
        "auto", help="auto (the mode predicted fastest), pipeline (layers) or expert (experts)"
    ),
) -> None:
    """Plan who holds what: layers (or experts) per node weighted by memory."""
    try:
        code = plan_command(
            model,
            str(hosts) if hosts else None,
            simulate,
            context,
            batch,
            bits,
            as_json,
            link,
            parallel=parallel,
            cluster=cluster,
            interfaces=interface,
        )
    except ValueError as e:  # plan_command's faults: the options, the hosts file, the model
        raise UserError(str(e)) from None
    raise typer.Exit(code)


def nodes_from_hosts(path: str | Path) -> list[NodeSpec]:
    """Nodes in rank order from a hosts.toml, each with its memory_gb (GB as Apple sells them)."""
    from launcher.hosts import read_hosts
    from launcher.planner import GIB, NodeSpec, with_estimated_gpu_limit

    nodes = []
    for h in read_hosts(path).hosts:
        if h.memory_gb is None:
            raise ValueError(
                f"host {h.name} has no memory_gb in {path}: until mlxdist agents report memory, "
                "planning needs it, e.g. memory_gb = 192"
            )
        nodes.append(with_estimated_gpu_limit(NodeSpec(h.name, int(h.memory_gb * GIB))))
    return nodes


def nodes_from_cluster(cluster: str, interfaces: list[str]) -> list[NodeSpec]:
    """The agents of a cluster that zeroconf finds, as a launch plans with them: in the order
    their cables give (by name when they give none), with the facts each agent reports."""
    from launcher.cluster import _specs, discover_nodes, ring
    from launcher.local import LaunchError
    from launcher.secret import load_secret

    found = discover_nodes(cluster, interfaces, load_secret(None))
    if not found:
        raise ValueError(f"no agent of cluster {cluster!r} answered on the interfaces given")
    try:
        found = ring(found, keep_order=False)
    except LaunchError:  # no ring through the cables: a plan still says what fits
        found = sorted(found, key=lambda n: n.name)
    return _specs(found)


def plan_command(
    model: str,
    hosts: str | None,
    simulate: str | None,
    context: int,
    batch: int,
    bits: int,
    as_json: bool,
    link: str = "tb5",
    parallel: str = "pipeline",
    cluster: str | None = None,
    interfaces: list[str] | None = None,
) -> int:
    """Prints the plan (layers per node, or experts per node with parallel="expert") and the
    predicted decode speed over `link` (tb5, tb4 or rdma); with parallel="auto" also the mode
    predicted fastest (launcher/autoparallel.py), and the plan of that mode (a tensor choice
    shows the pipeline's table beside it). 0 when the model fits, 1 when it does not. Faults
    raise ValueError."""
    from launcher import perfmodel
    from launcher.planner import (
        model_spec_from_folder,
        plan,
        plan_experts,
        plan_to_json,
        simulated_nodes,
    )
    from quantize.checkpoint import CheckpointError

    if parallel not in ("auto", "pipeline", "expert"):
        raise ValueError(f"--parallel {parallel!r} must be auto, pipeline or expert")
    if sum(x is not None for x in (hosts, simulate, cluster)) != 1:
        raise ValueError(
            "give exactly one of --hosts FILE and --simulate, e.g. --simulate 6x192GB, "
            "or --cluster NAME"
        )
    perfmodel.link(link)  # an unknown link is the user's fault, found before any work
    if cluster is not None:
        nodes = nodes_from_cluster(cluster, interfaces or [])
    else:
        nodes = nodes_from_hosts(hosts) if hosts is not None else simulated_nodes(simulate)
    try:
        spec = model_spec_from_folder(model, bits=bits)
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    choice = (
        auto_choice(model, bits, nodes, spec, link, context, batch) if parallel == "auto" else None
    )
    mode = choice.mode if choice else parallel
    planner = plan_experts if mode == "expert" else plan
    result = planner(nodes, spec, context=context, batch=batch)
    forecast = predict_for_plan(model, bits, nodes, spec, result, link)
    fits = result.fits
    if choice is not None and mode == "tensor":
        fits = next(o.fits for o in choice.outcomes if o.mode == "tensor")
    if as_json:
        extra = {"choice": {"mode": mode, "line": choice.line}} if choice else {}
        print(json.dumps({**plan_to_json(result), "prediction": forecast, **extra}, indent=2))
    else:
        console = Console()
        if not console.is_terminal:
            console.width = 100  # a pipe or a log: no terminal to fit
        print_plan(result, console)
        print_prediction(forecast, console)
        for note in result.notes:
            console.print(f"note: {note}", soft_wrap=True, highlight=False)
        if choice is not None:
            console.print(choice.line, soft_wrap=True, highlight=False)
    return 0 if fits else 1


def auto_choice(
    model: str,
    bits: int,
    nodes: list[NodeSpec],
    spec: ModelSpec,
    link: str,
    context: int,
    batch: int,
):
    """The mode `--parallel auto` picks for these nodes over `link`; None when the model's
    architecture cannot be built to count its bytes (the plan then stays a pipeline)."""
    from launcher import perfmodel
    from launcher.autoparallel import choose_parallel, tensor_refusal
    from quantize.checkpoint import CheckpointError, read_config

    try:
        config = read_config(model)
        active = perfmodel.bytes_per_token(config, bits=bits)
    except (CheckpointError, ValueError, KeyError, ImportError):
        return None
    refusal = tensor_refusal(config, len(nodes))
    return choose_parallel(nodes, spec, active, link, context, batch, tensor_refusal=refusal)


def predict_for_plan(
    model: str, bits: int, nodes: list[NodeSpec], spec: ModelSpec, p: Plan, link: str
) -> dict:
    """Predicted decode tokens/s (batch 1, at the plan's context) in each parallel mode: the
    pipeline with the plan's split; tensor and expert with whether their shares fit. Nodes
    without a chip take perfmodel's default for their memory. {"error": ...} when the model's
    architecture cannot be built to count its bytes."""
    from launcher import perfmodel
    from launcher.chips import chip_of_node_name
    from launcher.planner import plan_experts
    from quantize.checkpoint import CheckpointError, read_config

    try:
        active = perfmodel.bytes_per_token(read_config(model), bits=bits)
    except (CheckpointError, ValueError, KeyError, ImportError) as e:
        return {"error": f"no prediction: {e}"}
    kept = [n for n in nodes if n.name in set(p.order)]
    by_name = {n.name: n for n in kept}
    ranked = [by_name[name] for name in p.order]
    chips = [perfmodel.node_chip(n) for n in ranked]
    modes = {}
    # An expert plan is printed with its own mode; a pipeline plan with every mode beside it.
    for mode in ("expert",) if p.parallel == "expert" else perfmodel.MODES:
        if len(ranked) == 1 and mode != "pipeline":
            continue
        split = p.split if mode == "pipeline" else None
        pred = perfmodel.predict_decode(ranked, active, split, mode, link, context=p.context)
        if mode == p.parallel:
            fits = p.fits
        elif mode == "expert" and spec.num_experts:  # as `mlxdist plan --parallel expert` counts
            fits = plan_experts(ranked, spec, context=p.context, batch=p.batch).fits
        else:
            held = perfmodel.held_per_node(spec, active, len(ranked), mode)
            kv = spec.kv_bytes_per_token_per_layer * p.context * p.batch * spec.num_layers
            if mode == "tensor" and active.kv_split_by_heads:
                kv //= len(ranked)
            fits = all(held + kv <= row.usable_bytes for row in p.nodes)
        modes[mode] = {
            "tokens_per_s": pred.tokens_per_s,
            "seconds_per_token": pred.seconds_per_token,
            "comm_seconds": pred.comm_seconds,
            "messages": pred.messages,
            "fits": fits,
            "link": pred.link,
            "notes": pred.notes,
        }
    return {
        "batch": 1,
        "context": p.context,
        "link": next(iter(modes.values()))["link"],  # what the chips can use of what was asked
        "link_asked": link,
        "efficiency": perfmodel.EFFICIENCY,
        "message_overhead_s": perfmodel.MESSAGE_OVERHEAD,
        "chips": [
            {
                "name": n.name,
                "chip": c.name,
                "bandwidth_gb_s": c.bandwidth / 1e9,
                "assumed": chip_of_node_name(n.chip or "") is None,
            }
            for n, c in zip(ranked, chips)
        ],
        "modes": modes,
    }


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f}"


def _gpu_limit(row) -> str:
    """The node's GPU limit, marked where it comes from: "est." (from its memory), "wired"
    (sudo sysctl iogpu.wired_limit_mb), nothing for Metal's own figure; "-" without Metal."""
    from launcher.gpumem import ESTIMATE, WIRED

    if row.gpu_limit_bytes is None:
        return "-"
    mark = {ESTIMATE: " est.", WIRED: " wired"}.get(row.gpu_limit_from, "")
    return _gb(row.gpu_limit_bytes) + mark


def print_plan(p: Plan, console: Console) -> None:
    """The plan as a table of nodes, and its verdict in one line: a pipeline split, or each
    node's routed experts (expert parallelism, with the activations it holds)."""
    from launcher.planner import DEFAULT_HEADROOM

    expert = p.parallel == "expert"
    if expert:
        title = (
            f"{p.model}, expert parallel: {sum(p.experts)} routed experts shared out, "
            f"{p.context} tokens of context x {p.batch}"
        )
        caption = (
            f"GB = 10^9 bytes; every node holds every layer and the whole KV cache; memory "
            f"is what each node has less {DEFAULT_HEADROOM:.0%} headroom, at most its GPU limit"
        )
        share, counts = "experts", p.experts
    else:
        title = f"{p.model}: {sum(p.split)} layers, {p.context} tokens of context x {p.batch}"
        caption = (
            f"GB = 10^9 bytes; memory is what each node has less "
            f"{DEFAULT_HEADROOM:.0%} headroom for macOS and other apps, at most its GPU limit "
            "(Metal's working set; est. = estimated from memory)"
        )
        share, counts = "layers", p.split
    table = Table(title=title, show_edge=False, pad_edge=False, caption=caption)
    columns = ["rank", "node", share, "weights GB", "KV GB"]
    columns += ["act. GB"] * expert + ["total GB", "memory GB", "GPU limit GB", "free GB"]
    for col in columns:
        if col == "node":
            table.add_column(col, overflow="fold")
        else:
            table.add_column(col, justify="right", no_wrap=True)
    for row in p.nodes:
        cells = [str(row.rank), row.name, str(row.experts if expert else row.layers)]
        # KV in hundredths: small at short contexts, where 0.0 would read as none
        cells += [_gb(row.weights_bytes), f"{row.kv_bytes / 1e9:.2f}"]
        if expert:
            cells.append(f"{row.activation_bytes / 1e9:.2f}")
        cells += [_gb(row.total_bytes), _gb(row.usable_bytes), _gpu_limit(row)]
        cells.append(_gb(row.free_bytes))
        table.add_row(*cells, style=None if row.free_bytes >= 0 else "red")
    console.print(table)
    line = f"{'experts' if expert else 'split'} {','.join(map(str, counts))}: {p.message}"
    console.print(line, style=None if p.fits else "red", soft_wrap=True, highlight=False)


def print_prediction(f: dict, console: Console) -> None:
    if "error" in f:
        console.print(f["error"], soft_wrap=True, highlight=False)
        return
    table = Table(
        title=f"predicted decode: batch 1, {f['context']} tokens of context, link {f['link']}",
        show_edge=False,
        pad_edge=False,
        caption=f"from memory bandwidth x {f['efficiency']} and "
        f"{f['message_overhead_s'] * 1e6:.0f} us per message (launcher/perfmodel.py)",
    )
    for col in ("mode", "tokens/s", "ms/token", "messages ms", "memory"):
        table.add_column(col, justify="left" if col in ("mode", "memory") else "right")
    for mode, m in f["modes"].items():
        table.add_row(
            mode + (" (this split)" if mode == "pipeline" else ""),
            f"{m['tokens_per_s']:.1f}",
            f"{m['seconds_per_token'] * 1e3:.1f}",
            f"{m['comm_seconds'] * 1e3:.1f}",
            "fits" if m["fits"] else "does not fit",
            style=None if m["fits"] else "red",
        )
    console.print(table)
    groups: list[list] = []  # runs of consecutive nodes with the same chip
    for c in f["chips"]:
        last = groups[-1][0] if groups else None
        if last and (last["chip"], last["assumed"]) == (c["chip"], c["assumed"]):
            groups[-1].append(c)
        else:
            groups.append([c])
    parts = []
    for g in groups:
        who = g[0]["name"] if len(g) == 1 else f"{g[0]['name']}..{g[-1]['name']}"
        how = " (assumed from memory; name it: 6xM2Ultra-192GB)" if g[0]["assumed"] else ""
        parts.append(f"{who} {g[0]['chip']} {g[0]['bandwidth_gb_s']:.0f} GB/s{how}")
    console.print("chips: " + "; ".join(parts), soft_wrap=True, highlight=False)
    notes = sorted({n for m in f["modes"].values() for n in m["notes"]})
    for note in notes:
        console.print(f"note: {note}", soft_wrap=True, highlight=False)
