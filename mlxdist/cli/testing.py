"""`mlxdist testing make-r1` and `make-model`: the project's test models."""

from __future__ import annotations

from pathlib import Path

import typer

from mlxdist.cli.app import testing_app
from quantize.errors import UserError


@testing_app.command("make-r1")
def make_r1_cmd(
    out: Path = typer.Argument(..., help="folder to write the checkpoint into"),
    preset: str = typer.Option("tiny", help="tiny or 1gb"),
    set_: list[str] = typer.Option([], "--set", help="override a config field: KEY=VALUE"),
    seed: int = typer.Option(0, help="random seed"),
) -> None:
    """Write a toy checkpoint in DeepSeek-R1's exact on-disk format."""
    from mlxdist.testing.tiny_r1 import PRESETS, make_r1, parse_set

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    try:
        path = make_r1(out, preset=preset, overrides=parse_set(set_), seed=seed)
    except ValueError as e:  # a bad --set
        raise UserError(str(e)) from None
    typer.echo(f"wrote {path}")


@testing_app.command("make-model")
def make_model_cmd(
    family: str = typer.Argument(..., help="llama, mistral, qwen3, qwen3_moe, kimi_k2, ..."),
    out: Path = typer.Argument(..., help="folder to write the checkpoint into"),
    set_: list[str] = typer.Option([], "--set", help="override a config field: KEY=VALUE"),
    # Text, checked here: click's own refusal of a bad number is a box of lines.
    seed: str = typer.Option("0", help="random seed, a whole number"),
) -> None:
    """Write a tiny random checkpoint of a model family in its own on-disk format."""
    from mlxdist.testing.make_model import make_model
    from mlxdist.testing.tiny_r1 import parse_set

    if not seed.strip().isdigit():
        raise UserError(f"--seed {seed!r}: give a whole number, 0 or more")
    try:
        path = make_model(family, out, overrides=parse_set(set_), seed=int(seed))
    except ValueError as e:  # an unknown family, a bad --set, an out it cannot write
        raise UserError(str(e)) from None
    typer.echo(f"wrote {path}")
