"""The `mlxdist` command. Faults a user can cause end as one line and a non-zero exit."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
testing_app = typer.Typer(no_args_is_help=True, help="Make the project's test models.")
app.add_typer(testing_app, name="testing")


class UserError(Exception):
    """A fault the user can fix; printed as one line."""


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _user_errors() -> tuple[type[Exception], ...]:
    from launcher.agent_client import AgentError
    from launcher.hosts import HostsError
    from launcher.local import LaunchError
    from mlxdist.client.api_client import ClientError
    from quantize.checkpoint import CheckpointError
    from quantize.gguf import GGUFError

    return (UserError, CheckpointError, GGUFError, LaunchError, ClientError, AgentError, HostsError)


def _parse_split(split: str | None, ranks: int, num_layers: int) -> list[int]:
    from quantize.nodes import even_split, parse_split

    if split is not None:
        try:
            return parse_split(split, num_layers)
        except ValueError as e:
            raise UserError(f"--{e}") from None
    if ranks < 1:
        raise UserError("--local needs at least 1 rank")
    if ranks > num_layers:
        raise UserError(
            f"cannot split {num_layers} layers over {ranks} ranks: use at most {num_layers}"
        )
    return even_split(num_layers, ranks)


@app.command()
def launch(
    model: str | None = typer.Argument(None, help="model folder or .gguf file (default: demo)"),
    local: int | None = typer.Option(None, "--local", help="ranks on this machine (default 2)"),
    hosts: Path | None = typer.Option(None, help="hosts.toml: one rank per host, via agents"),
    cluster: str | None = typer.Option(None, help="agents of this cluster, found by zeroconf"),
    interface: list[str] = typer.Option([], help="interface to discover agents on"),
    secret_file: Path | None = typer.Option(None, "--secret-file", help="the cluster secret"),
    split: str | None = typer.Option(None, help="layers per rank, e.g. 10,20 (--local)"),
    context: int = typer.Option(4096, min=1, help="tokens of context to plan memory for"),
    prompt: str | None = typer.Option(None, help="answer this prompt and exit"),
    max_tokens: int = typer.Option(256, "--max-tokens", min=0),
    temp: float = typer.Option(0.0, "--temp", min=0.0, help="sampling temperature; 0 is greedy"),
    seed: int | None = typer.Option(None, min=0),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="apply the chat template"),
    port: int | None = typer.Option(None, help="coordinator HTTP port"),
    replan: bool = typer.Option(
        False, help="when a node fails, plan again on the others and go on with the chat"
    ),
    parallel: str = typer.Option(
        "pipeline", help="pipeline (layers per rank), expert (routed experts per rank) or tensor"
    ),
    experts: str | None = typer.Option(None, help="routed experts per rank, e.g. 3,3,2 (expert)"),
) -> None:
    """Start one rank per host (or N on this machine), then answer --prompt or open a chat."""
    from launcher.secret import SecretError

    params = {"max_tokens": max_tokens, "temperature": temp}
    if seed is not None:
        params["seed"] = seed
    try:
        if (hosts or cluster) and (local or split):
            raise UserError("--local and --split are for one machine; not with --hosts/--cluster")
        if hosts and cluster:
            raise UserError("give --hosts or --cluster, not both")
        if experts and (hosts or cluster):
            raise UserError("--experts is for --local: across hosts the node folders' cut holds")
        path = _launch_model(model)
        if hosts or cluster:
            from launcher.cluster import replan_agents, start_agents_cluster

            secret = _secret(secret_file)
            running = start_agents_cluster(
                path, hosts, cluster, interface, secret, context, port, parallel
            )
            again = partial(replan_agents, path, context, port)
        else:
            modes = _parallel_options(path, parallel, experts, split, local)
            running = _start_here(path, local or modes.get("ranks", 2), split, port, modes)
            again = partial(_replan_here, path, port, parallel)
        _converse(running, prompt, chat, params, again if replan else None)
    except (*_user_errors(), SecretError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo("\ninterrupted: every rank stopped", err=True)
        raise typer.Exit(130) from None


def _secret(path: Path | None) -> bytes:
    from launcher.secret import load_secret

    return load_secret(path)


def _launch_model(model: str | None) -> Path:
    from mlxdist.cli.models import resolve_model
    from quantize.checkpoint import inspect_model
    from quantize.nodes import damaged_files, node_manifest

    path = resolve_model(model)
    inspect_model(path)
    manifest = node_manifest(path)
    if manifest is not None:
        p = manifest["plan"]
        raise UserError(
            f"{path} is one node's folder (rank {p['rank']} of split {p['split']}): "
            f"launch the whole output folder, {path.parent.parent}"
        )
    # Before anything starts: a damaged shard is named now, not found as a crash mid-load.
    damaged = damaged_files(path)
    if damaged:
        raise UserError(
            f"{path / damaged[0]} does not match the sha256 in {path / 'manifest.json'}"
            + (f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else "")
            + ": copy it again, or quantize again (with --force) to rewrite it"
        )
    return path


def _parallel_options(
    path: Path, parallel: str, experts: str | None, split: str | None, local: int | None
) -> dict:
    from launcher.modes import parallel_options
    from quantize.checkpoint import read_config

    if split and parallel != "pipeline":
        raise UserError(f"--split is for pipeline mode: --parallel {parallel} runs every layer")
    try:
        return parallel_options(read_config(path), parallel, experts, local)
    except ValueError as e:
        raise UserError(str(e)) from None


def _start_here(
    path: Path, ranks: int, split: str | None, port: int | None, modes: dict | None = None
):
    from launcher.local import start_local, wait_ready
    from quantize.checkpoint import inspect_model

    modes = dict(modes or {})
    modes.pop("ranks", None)
    num_layers = inspect_model(path).num_layers
    parts = _parse_split(split, ranks, num_layers) if not modes else [num_layers] * ranks
    running = start_local(path, parts, port=port, **modes)
    what = f"layers {parts}" if not modes else f"{modes['parallel']} parallel"
    try:
        typer.echo(f"loading {path.name} on {len(parts)} ranks ({what})...", err=True)
        wait_ready(running)
    except BaseException:
        running.stop()
        raise
    return running


def _replan_here(path: Path, port: int | None, parallel: str, failed) -> object:
    """Local ranks again, one fewer than before (the failed rank's share spread over the rest);
    expert mode stays expert with the experts evened out, tensor mode falls back to layers."""
    from quantize.checkpoint import inspect_model
    from quantize.nodes import even_split

    ranks = len(failed.procs) - 1
    if ranks < 1:
        raise UserError("no rank remains to plan on: launch again")
    if parallel == "expert" and ranks > 1:
        return _start_here(path, ranks, None, port, {"parallel": "expert"})
    split = even_split(inspect_model(path).num_layers, ranks)
    return _start_here(path, ranks, ",".join(map(str, split)), port)


def _converse(running, prompt: str | None, chat: bool, params: dict, replan=None) -> None:
    """Answers the prompt or opens the chat; every rank is stopped however it ends.

    replan(failed cluster) -> a new cluster: the chat goes on there after a node fails."""
    from mlxdist.client.api_client import ClientError
    from mlxdist.client.chat import answer, cluster_failure, repl

    current = [running]

    def watch() -> str | None:
        return current[0].failure()

    def relaunch(failure: str) -> str:
        cluster_failure(watch)  # the launcher's own look names the failed nodes
        current[0].stop()
        typer.echo("planning again on the remaining nodes...", err=True)
        try:
            current[0] = replan(current[0])
        except _user_errors() as e:
            raise ClientError(str(e)) from None
        return current[0].url

    try:
        if prompt is not None:
            try:
                answer(running.url, prompt, chat, params)
            except ClientError as e:
                if e.lost and (failure := cluster_failure(watch)):
                    raise UserError(f"the cluster failed: {failure}") from None
                raise
        else:
            repl(running.url, params, watch=watch, relaunch=relaunch if replan else None)
    finally:
        current[0].stop()


# -- serve and chat: the cluster with its API alone, and the chat against any server --------


@app.command()
def serve(
    model: str | None = typer.Argument(None, help="model folder or .gguf file (default: demo)"),
    local: int | None = typer.Option(None, "--local", help="ranks on this machine (default 2)"),
    hosts: Path | None = typer.Option(None, help="hosts.toml: one rank per host, via agents"),
    secret_file: Path | None = typer.Option(None, "--secret-file", help="the cluster secret"),
    split: str | None = typer.Option(None, help="layers per rank, e.g. 10,20 (--local)"),
    context: int = typer.Option(4096, min=1, help="tokens of context to plan memory for"),
    max_context: int | None = typer.Option(
        None, "--max-context", min=1, help="most tokens per request (--local; default: model's)"
    ),
    host: str | None = typer.Option(
        None, help="address the API listens on (--local; default 127.0.0.1, this machine only)"
    ),
    port: int = typer.Option(8080, min=1, max=65535, help="the API's port"),
) -> None:
    """Run the cluster with its OpenAI-style HTTP API only, until Ctrl-C."""
    from launcher.secret import SecretError

    try:
        if hosts and (local or split or host or max_context):
            raise UserError("--local, --split, --host and --max-context are not for --hosts")
        path = _launch_model(model)
        if hosts:
            from launcher.cluster import start_agents_cluster

            secret = _secret(secret_file)
            running = start_agents_cluster(path, hosts, None, [], secret, context, port)
        else:
            running = _serve_here(path, local or 2, split, host or "127.0.0.1", port, max_context)
        _serve_until_stopped(running, path.name)
    except (*_user_errors(), SecretError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo("\nstopped: every rank stopped", err=True)


def _serve_here(
    path: Path, ranks: int, split: str | None, host: str, port: int, max_context: int | None
):
    import os
    import socket

    from launcher.local import start_local, wait_ready
    from quantize.checkpoint import inspect_model

    parts = _parse_split(split, ranks, inspect_model(path).num_layers)
    try:  # another server on the port would answer the readiness check in our place
        socket.create_server((host, port)).close()
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise UserError(f"cannot listen on {host}:{port}: {reason}") from None
    env = {"MLXDIST_MAX_CONTEXT": str(max_context)} if max_context else None
    running = start_local(path, parts, host=host, port=port, env=env)
    try:
        typer.echo(f"loading {path.name} on {len(parts)} ranks (layers {parts})...", err=True)
        wait_ready(running)
    except BaseException:
        running.stop()
        raise
    return running


def _rank_failure(running) -> str | None:
    return running.failure()


def _serve_until_stopped(running, name: str) -> None:
    import signal
    import time

    def stop(*_) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a service manager's stop, as Ctrl-C
    try:
        typer.echo(f"serving {name} at {running.url}/v1 (Ctrl-C stops every rank)")
        while (failure := _rank_failure(running)) is None:
            time.sleep(1.0)
        raise UserError(failure)
    finally:
        running.stop()


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
    except _user_errors() as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo("", err=True)
        raise typer.Exit(130) from None


@app.command()
def bench(
    model: str | None = typer.Argument(None, help="model folder or .gguf file (default: demo)"),
    local: int | None = typer.Option(None, "--local", help="ranks on this machine (default 2)"),
    hosts: Path | None = typer.Option(None, help="hosts.toml: one rank per host, via agents"),
    secret_file: Path | None = typer.Option(None, "--secret-file", help="the cluster secret"),
    split: str | None = typer.Option(None, help="layers per rank, e.g. 10,20 (--local)"),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", min=1, help="prompt length"),
    decode_tokens: int = typer.Option(64, "--decode-tokens", min=2, help="tokens to answer"),
    streams: int = typer.Option(4, min=1, help="concurrent streams for the aggregate figure"),
    as_json: bool = typer.Option(False, "--json", help="print the figures as JSON"),
    parallel: str = typer.Option(
        "pipeline", help="pipeline (layers per rank), expert (routed experts per rank) or tensor"
    ),
    experts: str | None = typer.Option(None, help="routed experts per rank, e.g. 3,3,2 (expert)"),
) -> None:
    """Start the cluster, measure prompt and decode speed, memory and traffic, then stop it."""
    from launcher.secret import SecretError
    from mlxdist.client.bench import bench as measure
    from mlxdist.client.bench import render

    try:
        if hosts and (local or split):
            raise UserError("--local and --split are for one machine; not with --hosts")
        if hosts and experts:
            raise UserError("--experts is for --local; across hosts the expert node folders decide")
        path = _launch_model(model)
        if hosts:
            from launcher.cluster import start_agents_cluster

            secret = _secret(secret_file)
            running = start_agents_cluster(path, hosts, None, [], secret, 4096, None, parallel)
        else:
            modes = _parallel_options(path, parallel, experts, split, local)
            running = _start_here(path, local or modes.get("ranks", 2), split, None, modes)
        try:
            result = measure(
                running.url,
                prompt_tokens=prompt_tokens,
                decode_tokens=decode_tokens,
                streams=streams,
                parallel=parallel,
            )
        finally:
            running.stop()
    except (*_user_errors(), SecretError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo("\ninterrupted: every rank stopped", err=True)
        raise typer.Exit(130) from None
    if as_json:
        typer.echo(result.to_json())
    else:
        from rich.console import Console

        render(result, Console(width=200, soft_wrap=True))


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
    dry_run: bool = typer.Option(False, "--dry-run", help="print sizes from config.json only"),
    force: bool = typer.Option(False, help="overwrite a non-empty OUT"),
) -> None:
    """Quantise a checkpoint to MLX weights and cut it into per-node folders."""
    from mlxdist.cli import quantize as quantize_cli
    from quantize.convert import QuantizeError, Settings
    from quantize.recipes import RecipeError
    from quantize.source import SourceError

    try:
        settings = Settings(bits, group_size, mode, recipe, list(override))
        settings.max_file_bytes = int(max_file_size * 1e9)
        cut = {
            "nodes": nodes,
            "split": split,
            "plan": plan,
            "parallel": parallel,
            "experts": experts,
        }
        if dry_run:
            quantize_cli.dry_run(src, settings, cut)
            return
        if out is None:
            raise UserError("give OUT, the folder to write the model into (or --dry-run)")
        quantize_cli.quantize(src, out, settings, force, cut)
    except (*_user_errors(), QuantizeError, RecipeError, SourceError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo("\ninterrupted: run the same command again to resume", err=True)
        raise typer.Exit(130) from None


@app.command("plan")
def plan_cmd(
    model: str = typer.Argument(..., help="model folder or a bare config.json"),
    hosts: Path | None = typer.Option(None, help="hosts.toml with each host's memory_gb"),
    simulate: str | None = typer.Option(None, help='a cluster that is not here, e.g. "6x192GB"'),
    context: int = typer.Option(4096, min=1, help="tokens of context to hold in the KV cache"),
    batch: int = typer.Option(1, min=1, help="sequences decoded at once"),
    bits: int = typer.Option(4, help="width planned for a model not yet quantised"),
    as_json: bool = typer.Option(False, "--json", help="the plan as JSON (for quantize --plan)"),
    link: str = typer.Option("tb5", help="link for the prediction: tb5, tb4 or rdma"),
    parallel: str = typer.Option("pipeline", help="pipeline (layers) or expert (routed experts)"),
) -> None:
    """Plan who holds what: layers (or experts) per node weighted by memory."""
    from mlxdist.cli.plan import plan_command

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
        )
    except (*_user_errors(), ValueError) as e:
        _fail(str(e))
    raise typer.Exit(code)


@app.command()
def init(
    secret_file: Path | None = typer.Option(
        None, "--secret-file", help="default ~/.mlxdist/secret"
    ),
    force: bool = typer.Option(False, help="replace an existing secret"),
) -> None:
    """Create the cluster secret that every agent and launcher shares."""
    from launcher.secret import SecretError
    from mlxdist.cli.agent import init as run_init

    try:
        run_init(secret_file, force)
    except SecretError as e:
        _fail(str(e))


@app.command()
def agent(
    cluster: str = typer.Option("default", help="cluster name: launchers find only their own"),
    interface: list[str] = typer.Option([], help="interface to listen and advertise on"),
    port: int = typer.Option(52417, help="the agent's port"),
    secret_file: Path | None = typer.Option(None, "--secret-file", help="the cluster secret"),
    models_dir: Path | None = typer.Option(None, "--models-dir", help="where shards are kept"),
) -> None:
    """Run this node's agent: advertised by zeroconf, starts ranks when a launcher asks."""
    from launcher.hostfacts import HostFactsError
    from launcher.interfaces import InterfaceError
    from launcher.secret import SecretError
    from mlxdist.cli.agent import run_agent

    try:
        run_agent(cluster, interface, port, secret_file, models_dir)
    except (SecretError, InterfaceError, HostFactsError, OSError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@app.command()
def status(
    cluster: str = typer.Option("default", help="cluster name"),
    interface: list[str] = typer.Option([], help="interface to discover agents on"),
    secret_file: Path | None = typer.Option(None, "--secret-file", help="the cluster secret"),
    timeout: float = typer.Option(3.0, help="seconds to listen for agents"),
) -> None:
    """Agents of the cluster, their memory, links and running ranks, as a table."""
    from launcher.interfaces import InterfaceError
    from launcher.secret import SecretError
    from mlxdist.cli.agent import status as run_status

    try:
        code = run_status(cluster, interface, secret_file, timeout)
    except (*_user_errors(), SecretError, InterfaceError) as e:
        _fail(str(e))
    raise typer.Exit(code)


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
        _fail(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    try:
        path = make_r1(out, preset=preset, overrides=parse_set(set_), seed=seed)
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"wrote {path}")


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        sys.exit(1)


if __name__ == "__main__":
    main()
