"""The `mlxdist` command. Faults a user can cause end as one line and a non-zero exit."""

from __future__ import annotations

import sys
from typing import Any

import click
import typer
from typer.core import TyperGroup

from quantize.errors import UserError


class Commands(TyperGroup):
    """The command group: a UserError raised anywhere under any command ends as one red
    `error: ...` line on stderr and exit 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as e:
            typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from None


app = typer.Typer(cls=Commands, add_completion=False, no_args_is_help=True, help=__doc__)
testing_app = typer.Typer(no_args_is_help=True, help="Make the project's test models.")
app.add_typer(testing_app, name="testing")


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        sys.exit(1)
