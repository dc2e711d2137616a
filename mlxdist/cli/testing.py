"""`mlxdist testing make-r1` and `make-model`: the project's test models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer

from mlxdist.cli.app import testing_app
from quantize.errors import UserError

# fit-mtp's defaults, as mlxdist.testing.fit_mtp.DEFAULTS (which the CLI may not import).
FIT_DEFAULTS = {"steps": 200, "sequences": 96, "tokens": 48, "prompt_tokens": 4, "lr": 3e-3}


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


@testing_app.command("fit-mtp")
def fit_mtp_cmd(
    model: Path = typer.Argument(..., help="an R1-format folder made by make-r1"),
    steps: str = typer.Option(str(FIT_DEFAULTS["steps"]), help="training steps"),
    sequences: str = typer.Option(
        str(FIT_DEFAULTS["sequences"]), help="training continuations (a quarter more held out)"
    ),
    tokens: str = typer.Option(str(FIT_DEFAULTS["tokens"]), help="tokens per continuation"),
    prompt_tokens: str = typer.Option(
        str(FIT_DEFAULTS["prompt_tokens"]), help="random token ids each continuation follows"
    ),
    seed: str = typer.Option("0", help="random seed, a whole number"),
    lr: str = typer.Option(str(FIT_DEFAULTS["lr"]), help="Adam's learning rate"),
) -> None:
    """Fit a toy R1's multi-token-prediction layer to the model's own continuations, in place."""
    args = [
        str(model),
        f"--steps={_count('--steps', steps, 0)}",
        f"--sequences={_count('--sequences', sequences, 2)}",
        f"--tokens={_count('--tokens', tokens, 2)}",
        f"--prompt-tokens={_count('--prompt-tokens', prompt_tokens, 1)}",
        f"--seed={_seed(seed)}",
        f"--lr={_rate(lr)}",
    ]
    # The fit runs the model in MLX: in a process of its own, as the CLI never imports the
    # runtime. It prints its own progress, table and error line.
    code = subprocess.call([sys.executable, "-m", "mlxdist.testing.fit_mtp", *args])
    if code:
        raise typer.Exit(code)


def _count(option: str, text: str, least: int) -> int:
    if not text.strip().isdigit() or int(text) < least:
        raise UserError(f"{option} {text!r}: give a whole number, {least} or more")
    return int(text)


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = 0.0
    if not 0 < rate < 1:
        raise UserError(f"--lr {text!r}: give a learning rate above 0 and below 1")
    return rate
