"""The user's side of `mlxdist quantize`: sources, the split, a progress bar, tables."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from quantize.checkpoint import human_bytes, inspect_model
from quantize.convert import QuantizeError, Settings, make_plan, run
from quantize.estimate import estimate
from quantize.nodes import even_split, parse_split, read_plan_file
from quantize.recipes import R1_RECIPES, parse_override
from quantize.source import config_only, resolve_source

console = Console(stderr=True, soft_wrap=True)  # one fact per line, however narrow


def choose_split(
    num_layers: int, nodes: int | None, split: str | None, plan: Path | None
) -> list[int] | None:
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
    path = config_only(src)
    if path.suffix == ".gguf":
        raise QuantizeError("--dry-run reads a config.json; a GGUF file is already quantised")
    config = inspect_model(path).config
    num_layers = config["num_hidden_layers"]
    settings.split = choose_split(num_layers, **cut)
    kw = {"bits": settings.bits, "group_size": settings.group_size, "mode": settings.mode}
    overrides = tuple(
        parse_override(o, settings.group_size or 64, settings.mode) for o in settings.overrides
    )
    chosen = estimate(config, recipe=settings.recipe, overrides=overrides, **kw)
    table = Table(title=f"{config.get('model_type')}: {chosen.parameters / 1e9:.1f}B parameters")
    for col in ("recipe", "size GB", "bits/weight"):
        table.add_column(col, justify="right" if col != "recipe" else "left")
    default = "affine" if settings.mode == "affine" else settings.mode
    name = settings.recipe or f"{chosen.bits_per_weight:.0f}-bit {default}"
    rows = [(f"{name} (chosen)", chosen)]
    rows += [("bf16 (no quantisation)", estimate(config, quantize=False))]
    rows += [(r, estimate(config, recipe=r)) for r in R1_RECIPES if r != settings.recipe]
    for label, e in rows:
        table.add_row(label, f"{e.total_bytes / 1e9:.1f}", f"{e.bits_per_weight:.2f}")
    console.print(table)
    split = settings.split or [num_layers]
    nodes = Table(title=f"each node's share ({name})")
    for col in ("node", "layers", "size GB"):
        nodes.add_column(col, justify="right")
    start = 0
    for r, (n, b) in enumerate(zip(split, chosen.node_bytes(split))):
        nodes.add_row(str(r), f"{start}-{start + n - 1}", f"{b / 1e9:.2f}")
        start += n
    console.print(nodes)


def quantize(src: str, out: Path, settings: Settings, force: bool, cut: dict) -> None:
    source = resolve_source(src)
    tmp = None
    try:
        if source.suffix == ".gguf":
            from quantize.gguf import import_gguf

            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".gguf-import-", dir=out.parent))
            console.print(f"importing {source.name}")
            source = import_gguf(source, tmp / "model")
        settings.split = choose_split(inspect_model(source).num_layers, **cut)
        _convert(source, out, settings, force)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _convert(source: Path, out: Path, settings: Settings, force: bool) -> None:
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

        def on_progress(done: int, total: int, tensors: int, all_tensors: int) -> None:
            bar.update(task, completed=done, tensors=f"{tensors}/{all_tensors} tensors")

        result = run(source, out, plan, force=force, on_progress=on_progress)
    above = (result.peak_rss - result.start_rss) / 2**20
    console.print(
        f"wrote {out} ({human_bytes(plan.output_bytes)} in {len(plan.files)} files"
        + (f", {len(result.skipped)} kept from an earlier run" if result.skipped else "")
        + f"); peak memory {result.peak_rss / 2**20:.0f} MiB, {above:.0f} MiB above the start, "
        f"largest source layer {plan.largest_layer_bytes / 2**20:.0f} MiB"
    )
    if plan.split:
        console.print(f"node folders: {out / 'nodes'}/0..{len(plan.split) - 1} ({plan.split})")
