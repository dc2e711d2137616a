"""`mlxdist quantize`: sources, the split, a progress bar, tables."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from mlxdist.cli.app import app
from quantize.errors import UserError

if TYPE_CHECKING:
    from quantize.convert import Settings

console = Console(stderr=True, soft_wrap=True)  # one fact per line, however narrow


@app.command("quantize")
def quantize_cmd(
    src: str = typer.Argument(..., help="model folder, .gguf file, or Hugging Face repo id"),
    out: Path | None = typer.Argument(None, help="output folder (not needed with --dry-run)"),
    bits: int | None = typer.Option(None, help="bits per weight (default: 4 for affine)"),
    group_size: int | None = typer.Option(None, "--group-size", help="default: 64 for affine"),
    mode: str = typer.Option("affine", help="affine, mxfp4, nvfp4 or mxfp8"),
    recipe: str | None = typer.Option(None, help="r1-4bit, r1-3bit, or mlx-lm's mixed_3_6 ..."),
    override: list[str] = typer.Option(
        [], "--override", help="PATTERN=BITS[:GROUP[:MODE]] or PATTERN=none, e.g. '*.o_proj=8'"
    ),
    nodes: int | None = typer.Option(None, help="also cut per-node folders, split evenly"),
    split: str | None = typer.Option(None, help="also cut per-node folders: layers per node"),
    plan: Path | None = typer.Option(None, help="also cut per-node folders for this plan file"),
    parallel: str = typer.Option(
        "pipeline", help="node folders for a pipeline (layers) or expert (routed experts)"
    ),
    experts: str | None = typer.Option(None, help="routed experts per node, e.g. 86,85,85"),
    max_file_size: float = typer.Option(5.0, "--max-file-size", help="GB per output file"),
    dry: bool = typer.Option(False, "--dry-run", help="print sizes from config.json only"),
    force: bool = typer.Option(False, help="overwrite a non-empty OUT"),
    keep_mtp: bool = typer.Option(
        False, "--keep-mtp", help="keep R1's multi-token-prediction layer (for --speculative mtp)"
    ),
) -> None:
    """Quantise a checkpoint to MLX weights and cut it into per-node folders."""
    from quantize.convert import Settings

    try:
        settings = Settings(bits, group_size, mode, recipe, list(override))
        settings.max_file_bytes = int(max_file_size * 1e9)
        settings.keep_mtp = keep_mtp
        cut = {
            "nodes": nodes,
            "split": split,
            "plan": plan,
            "parallel": parallel,
            "experts": experts,
        }
        if dry:
            dry_run(src, settings, cut)
            return
        if out is None:
            raise UserError("give OUT, the folder to write the model into (or --dry-run)")
        quantize(src, out, settings, force, cut)
    except KeyboardInterrupt:
        typer.echo("\ninterrupted: run the same command again to resume", err=True)
        raise typer.Exit(130) from None


def choose_cut(
    config: dict,
    nodes: int | None = None,
    split: str | None = None,
    plan: Path | None = None,
    parallel: str = "pipeline",
    experts: str | None = None,
) -> tuple[list[int] | None, list[int] | None]:
    """(layers per node, None) for pipeline folders, (None, experts per node) for expert
    folders, or (None, None) for none."""
    from quantize.convert import QuantizeError

    if parallel not in ("pipeline", "expert"):
        raise QuantizeError(f"--parallel {parallel!r} must be pipeline or expert")
    if parallel == "pipeline":
        if experts is not None:
            raise QuantizeError("--experts is for expert folders: add --parallel expert")
        return choose_split(config["num_hidden_layers"], nodes, split, plan), None
    return None, choose_experts(config, nodes, split, plan, experts)


def choose_experts(
    config: dict, nodes: int | None, split: str | None, plan: Path | None, experts: str | None
) -> list[int]:
    from quantize.convert import QuantizeError
    from quantize.nodes import (
        even_split,
        expert_sets,
        parse_experts,
        read_expert_plan_file,
        routed_experts,
    )

    num = routed_experts(config)
    if split is not None:
        raise QuantizeError("--split cuts layers for a pipeline: use --experts with expert mode")
    if not num:
        raise QuantizeError(
            f"{config.get('model_type')} has no routed experts to share out: leave out "
            "--parallel expert"
        )
    if plan is not None and (nodes is not None or experts is not None):
        raise QuantizeError("give --plan alone: it holds the expert counts")
    try:
        if plan is not None:
            counts = read_expert_plan_file(plan)
        elif experts is not None:
            counts = parse_experts(experts, num)
        elif nodes is not None:
            if not 2 <= nodes <= num:
                raise ValueError(f"--nodes {nodes}: expert mode needs 2 to {num} nodes")
            counts = even_split(num, nodes)
        else:
            raise ValueError("--parallel expert needs --nodes N, --experts 3,3,2 or --plan FILE")
        if nodes is not None and nodes != len(counts):
            raise ValueError(f"--nodes {nodes} but --experts gives {len(counts)} nodes")
        if len(counts) < 2:
            raise ValueError("expert mode needs at least 2 nodes")
        expert_sets(num, counts)  # a plan file's counts must cover the model's experts
    except ValueError as e:
        raise QuantizeError(str(e)) from None
    return counts


def choose_split(
    num_layers: int, nodes: int | None, split: str | None, plan: Path | None
) -> list[int] | None:
    from quantize.convert import QuantizeError
    from quantize.nodes import even_split, parse_split, read_plan_file

    given = [x is not None for x in (nodes, split, plan)]
    if sum(given) > 1:
        raise QuantizeError("give at most one of --nodes, --split and --plan")
    try:
        if nodes is not None:
            return even_split(num_layers, nodes)
        if split is not None:
            return parse_split(split, num_layers)
        if plan is not None:
            parts = read_plan_file(plan)
            if sum(parts) != num_layers:
                raise ValueError(f"{plan} splits {sum(parts)} layers, the model has {num_layers}")
            return parts
    except ValueError as e:
        raise QuantizeError(str(e)) from None
    return None


def dry_run(src: str, settings: Settings, cut: dict) -> None:
    """Prints sizes per recipe and each node's share, reading only config.json."""
    from quantize.checkpoint import inspect_model
    from quantize.convert import QuantizeError, check_keep_mtp
    from quantize.estimate import estimate
    from quantize.recipes import R1_RECIPES, default_spec, parse_override
    from quantize.source import config_only

    path = config_only(src)
    if path.suffix == ".gguf":
        raise QuantizeError("--dry-run reads a config.json; a GGUF file is already quantised")
    config = inspect_model(path).config
    num_layers = config["num_hidden_layers"]
    if settings.keep_mtp:
        check_keep_mtp(config)
    settings.split, settings.experts = choose_cut(config, **cut)
    kw = {"bits": settings.bits, "group_size": settings.group_size, "mode": settings.mode}
    kw["mtp"] = settings.keep_mtp
    overrides = tuple(
        parse_override(o, settings.group_size or 64, settings.mode) for o in settings.overrides
    )
    chosen = estimate(config, recipe=settings.recipe, overrides=overrides, **kw)
    table = Table(title=f"{config.get('model_type')}: {chosen.parameters / 1e9:.1f}B parameters")
    for col in ("recipe", "size GB", "bits/weight"):
        table.add_column(col, justify="right" if col != "recipe" else "left")
    default = "affine" if settings.mode == "affine" else settings.mode
    # the chosen width, not bits/weight rounded (4-bit affine stores 4.5 bits a weight)
    bits = default_spec(settings.bits, settings.group_size, settings.mode)["bits"]
    name = settings.recipe or f"{bits}-bit {default}"
    rows = [(f"{name} (chosen)", chosen)]
    mtp = settings.keep_mtp
    rows += [("bf16 (no quantisation)", estimate(config, quantize=False, mtp=mtp))]
    rows += [(r, estimate(config, recipe=r, mtp=mtp)) for r in R1_RECIPES if r != settings.recipe]
    for label, e in rows:
        table.add_row(label, f"{e.total_bytes / 1e9:.1f}", f"{e.bits_per_weight:.2f}")
    console.print(table)
    if mtp:
        where = "node 0" if settings.experts else "the last node" if settings.split else "it"
        console.print(
            f"the MTP layer adds {chosen.mtp_bytes / 1e9:.2f} GB to {where} "
            "(its head counted as shared with lm_head, as in R1's official checkpoint)"
        )
    if settings.experts:
        _expert_shares(chosen, settings.experts, config, name)
        return
    split = settings.split or [num_layers]
    nodes = Table(title=f"each node's share ({name})")
    for col in ("node", "layers", "size GB"):
        nodes.add_column(col, justify="right")
    start = 0
    for r, (n, b) in enumerate(zip(split, chosen.node_bytes(split))):
        nodes.add_row(str(r), f"{start}-{start + n - 1}", f"{b / 1e9:.2f}")
        start += n
    console.print(nodes)


def _expert_shares(chosen, counts: list[int], config: dict, name: str) -> None:
    from quantize.nodes import model_expert_sets, spans

    nodes = Table(title=f"each node's share, expert parallel ({name})")
    for col in ("node", "experts", "size GB"):
        nodes.add_column(col, justify="right")
    sets = model_expert_sets(config, counts)
    for r, (held, b) in enumerate(zip(sets, chosen.expert_node_bytes(counts))):
        nodes.add_row(str(r), str(len(held)), f"{b / 1e9:.2f}")
    if config.get("n_group", 1) > 1:
        console.print(f"each node holds a few experts of every group; node 0: {spans(sets[0])}")
    console.print(nodes)


def quantize(src: str, out: Path, settings: Settings, force: bool, cut: dict) -> None:
    from quantize.checkpoint import inspect_model
    from quantize.source import config_only, resolve_source

    if (config := config_only(src)).suffix == ".json":  # a refusal before any weight is fetched
        info = inspect_model(config)
        if settings.keep_mtp:
            from quantize.convert import check_keep_mtp

            check_keep_mtp(info.config)
    source = resolve_source(src)
    tmp = None
    try:
        if source.suffix == ".gguf":
            from quantize.gguf import import_gguf

            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".gguf-import-", dir=out.parent))
            console.print(f"importing {source.name}")
            source = import_gguf(source, tmp / "model")
        settings.split, settings.experts = choose_cut(inspect_model(source).config, **cut)
        _convert(source, out, settings, force)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _convert(source: Path, out: Path, settings: Settings, force: bool) -> None:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from quantize.checkpoint import human_bytes
    from quantize.convert import make_plan, run

    plan = make_plan(source, settings)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[tensors]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("quantising", total=plan.source_bytes, tensors="")
        cutting = None

        def on_progress(done: int, total: int, tensors: int, all_tensors: int) -> None:
            bar.update(task, completed=done, tensors=f"{tensors}/{all_tensors} tensors")

        def on_cut(done: int, total: int) -> None:
            nonlocal cutting
            if cutting is None:
                cutting = bar.add_task("expert slices", total=total, tensors="")
            bar.update(cutting, completed=done)

        result = run(source, out, plan, force=force, on_progress=on_progress, on_cut=on_cut)
    above = (result.peak_rss - result.start_rss) / 2**20
    console.print(
        f"wrote {out} ({human_bytes(plan.output_bytes)} in {len(plan.files)} files"
        + (f", {len(result.skipped)} kept from an earlier run" if result.skipped else "")
        + f"); peak memory {result.peak_rss / 2**20:.0f} MiB, {above:.0f} MiB above the start, "
        f"largest source layer {plan.largest_layer_bytes / 2**20:.0f} MiB"
    )
    if plan.split:
        console.print(f"node folders: {out / 'nodes'}/0..{len(plan.split) - 1} ({plan.split})")
    if plan.experts:
        console.print(
            f"expert node folders: {out / 'nodes'}/0..{len(plan.experts) - 1} "
            f"({plan.experts} experts; their slices take "
            f"{human_bytes(sum(c.nbytes for c in plan.cuts))})"
        )
    if plan.mtp is not None:
        kept = [s for u in plan.units if u.mtp for s in u.slots or []]
        where = "nodes/0" if plan.experts else f"nodes/{len(plan.split) - 1}" if plan.split else ""
        console.print(
            f"kept the MTP layer: {len(kept)} mtp.* tensors, "
            f"{human_bytes(sum(s.nbytes for s in kept))}"
            + (f", in {where}" if where else "")
            + ("" if plan.mtp["own_head"] else "; its head equals lm_head, which it will use")
        )
