"""`mlxdist chat`: the chat against a running cluster or any OpenAI-compatible server."""

from __future__ import annotations

import typer

from mlxdist.cli.app import app
from quantize.errors import UserError


@app.command()
def chat(
    url: str = typer.Option(..., "--url", help="the server, e.g. http://127.0.0.1:8080"),
    model: str | None = typer.Option(None, help="model name (default: the server's first)"),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=0, help="default: server's"),
    temp: float | None = typer.Option(None, "--temp", min=0.0, help="default: server's"),
    seed: int | None = typer.Option(None, min=0),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="OPENAI_API_KEY", help="sent as a bearer token, if given"
    ),
) -> None:
    """Open the chat against a running mlxdist cluster or any OpenAI-compatible server."""
    from mlxdist.client.api_client import headers_for, list_models
    from mlxdist.client.chat import repl

    headers = headers_for(api_key)
    try:
        if model is None:
            names = list_models(url, headers)
            if not names:
                raise UserError(f"{url} serves no model: name one with --model")
            model = names[0]
        params: dict = {"model": model}
        for key, value in (("max_tokens", max_tokens), ("temperature", temp), ("seed", seed)):
            if value is not None:
                params[key] = value
        repl(url, params, headers)
    except KeyboardInterrupt:
        typer.echo("", err=True)
        raise typer.Exit(130) from None
