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
    seed: str = typer.Option("0", help="random seed, a whole number"),
) -> None:
    """Write a toy checkpoint in DeepSeek-R1's exact on-disk format."""
    from mlxdist.testing.tiny_r1 import PRESETS, make_r1, parse_set

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: give a folder to write the model into")
    try:
        path = make_r1(out, preset=preset, overrides=parse_set(set_), seed=_seed(seed))
    except ValueError as e:  # a bad --set
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"cannot write the model into {out}: {e.strerror or e}") from None
    typer.echo(f"wrote {path}")


def _seed(text: str) -> int:
    """--seed, taken as text: click's own refusal of a bad number is a box of lines."""
    if not text.strip().isdigit():
        raise UserError(f"--seed {text!r}: give a whole number, 0 or more")
    return int(text)


@testing_app.command("make-model")
def make_model_cmd(
    family: str = typer.Argument(..., help="llama, mistral, qwen3, qwen3_moe, kimi_k2, ..."),
    out: Path = typer.Argument(..., help="folder to write the checkpoint into"),
    set_: list[str] = typer.Option([], "--set", help="override a config field: KEY=VALUE"),
    seed: str = typer.Option("0", help="random seed, a whole number"),
) -> None:
    """Write a tiny random checkpoint of a model family in its own on-disk format."""
    from mlxdist.testing.make_model import make_model
    from mlxdist.testing.tiny_r1 import parse_set

    try:
        path = make_model(family, out, overrides=parse_set(set_), seed=_seed(seed))
    except ValueError as e:  # an unknown family, a bad --set, an out it cannot write
        raise UserError(str(e)) from None
    typer.echo(f"wrote {path}")
