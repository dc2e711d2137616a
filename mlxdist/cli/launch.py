"""`mlxdist launch`, `mlxdist serve` and `mlxdist bench`: start the cluster, then talk to it."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from mlxdist.cli.api_options import (
    ALLOWED_HOST_OPTION,
    BODY_OPTION,
    CORS_OPTION,
    DEFAULT_BODY_MB,
    DOCS_OPTION,
    DRAFT_TOKENS_OPTION,
    INSECURE_OPTION,
    KEY_FILE_OPTION,
    KEY_OPTION,
    KV_BITS_OPTION,
    PROMPT_CACHE_OPTION,
    SPECULATIVE_OPTION,
    check_kv_bits,
    kv_settings,
    speculative_settings,
)
from mlxdist.cli.app import app
from quantize.errors import UserError

if TYPE_CHECKING:
    from quantize.source import ModelRef

BACKEND_HELP = (
    "ring, jaccl (RDMA over Thunderbolt 5, every pair cabled), jaccl-ring (RDMA over a ring of "
    "cables) or auto (default: hosts file's, else auto)"
)


MODEL_HELP = "model folder, .gguf file or Hugging Face repo id org/name[@revision] (default: demo)"

FETCH_HELP = (
    "how each node gets its files of a Hugging Face repo: hub (its agent downloads only its "
    "files), push (this machine downloads once and sends each node its files) or auto (hub when "
    "every node reaches the Hub)"
)

VERIFY_HELP = (
    "hash again the files of a Hugging Face repo that the nodes' caches hold already (by default "
    "a weight file checked when it was fetched is trusted at its size, not read again)"
)

PARALLEL_HELP = (
    "auto (the mode the performance model predicts fastest here, the default), pipeline "
    "(layers per rank), expert (routed experts per rank) or tensor"
)


def _backend(backend: str | None, across_hosts: bool) -> str | None:
    """--backend checked: ring, jaccl, jaccl-ring or auto; on one machine the ranks run on the
    ring."""
    if backend is not None and backend not in ("ring", "jaccl", "jaccl-ring", "auto"):
        raise UserError(f"--backend must be ring, jaccl, jaccl-ring or auto, not {backend!r}")
    if backend in ("jaccl", "jaccl-ring") and not across_hosts:
        raise UserError(
            f"--backend {backend} is for Macs cabled over Thunderbolt 5 (--hosts/--cluster)"
        )
    return backend


def _parallel(parallel: str) -> str:
    """--parallel checked once, before anything starts: auto, pipeline, expert or tensor."""
    from launcher.autoparallel import check_parallel

    return check_parallel(parallel)


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
    model: str | None = typer.Argument(None, help=MODEL_HELP),
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
    parallel: str = typer.Option("auto", help=PARALLEL_HELP),
    experts: str | None = typer.Option(None, help="routed experts per rank, e.g. 3,3,2 (expert)"),
    backend: str | None = typer.Option(None, help=BACKEND_HELP),
    fetch: str = typer.Option("auto", help=FETCH_HELP),
    verify: bool = typer.Option(False, "--verify", help=VERIFY_HELP),
    api_key: str | None = KEY_OPTION,
    api_key_file: Path | None = KEY_FILE_OPTION,
    insecure: bool = INSECURE_OPTION,
    max_body_mb: int = BODY_OPTION,
    docs: bool = DOCS_OPTION,
    allowed_host: list[str] = ALLOWED_HOST_OPTION,
    cors_origin: list[str] = CORS_OPTION,
    kv_bits: int | None = KV_BITS_OPTION,
    prompt_cache_bytes: str | None = PROMPT_CACHE_OPTION,
    speculative: str = SPECULATIVE_OPTION,
    draft_tokens: int | None = DRAFT_TOKENS_OPTION,
) -> None:
    """Start one rank per host (or N on this machine), then answer --prompt or open a chat."""
    params = {"max_tokens": max_tokens, "temperature": temp}
    if seed is not None:
        params["seed"] = seed
    try:
        kv = kv_settings(kv_bits, prompt_cache_bytes)
        kv |= speculative_settings(speculative, draft_tokens)  # rank 0's, carried along
        guard = (api_key, api_key_file, insecure, max_body_mb, docs, allowed_host, cors_origin)
        api = _launch_api(bool(hosts or cluster), *guard)
        if (hosts or cluster) and (local or split):
            raise UserError("--local and --split are for one machine; not with --hosts/--cluster")
        if hosts and cluster:
            raise UserError("give --hosts or --cluster, not both")
        if experts and (hosts or cluster):
            raise UserError("--experts is for --local: across hosts the node folders' cut holds")
        parallel = _parallel(parallel)
        backend = _backend(backend, bool(hosts or cluster))
        across = bool(hosts or cluster)
        ref = _across_ref(model, fetch, verify) if across else _model_ref(model)
        path = _launch_model(ref)
        check_kv_bits(path, kv["kv_bits"])
        _check_mtp(path, kv["speculative"])
        if hosts or cluster:
            from launcher.cluster import replan_agents, start_agents_cluster

            secret = _secret(secret_file)
            where = (hosts, cluster, interface, secret, context, port, parallel, backend)
            running = start_agents_cluster(path, *where, fetch=fetch, ref=ref, api=api, **kv)
            again = partial(replan_agents, path, context, port)
        else:
            parallel = _auto_here(path, parallel, experts, split, local, context)
            modes = _parallel_options(path, parallel, experts, split, local)
            kv["context"] = context
            modes |= {"api": api, "kv": kv}
            running = _start_here(path, local or modes.get("ranks", 2), split, port, modes)
            again = partial(_replan_here, path, port, parallel, api, kv=kv)
        headers = {"Authorization": f"Bearer {api['api_key']}"} if api["api_key"] else {}
        _converse(running, prompt, chat, params, again if replan else None, headers)
    except KeyboardInterrupt:
        typer.echo("\ninterrupted: every rank stopped", err=True)
        raise typer.Exit(130) from None


def _launch_api(across: bool, key, key_file, insecure, *settings) -> dict:
    """launch's API settings. Across hosts the API listens on a cluster address: with no key
    given (and no --insecure-no-api-key) the launch makes one for its own chat alone."""
    import secrets

    from mlxdist.cli.api_options import api_key, api_settings

    key = api_key(key, key_file)
    if key is None and across and not insecure:
        key = secrets.token_urlsafe(32)
    return api_settings(key, *settings)


def _secret(path: Path | None) -> bytes:
    from launcher.secret import load_secret

    return load_secret(path)


def _model_ref(model: str | None, whole: bool = True) -> ModelRef | None:
    """The model named: a Hugging Face repo id (org/name[@revision]) is fetched whole into the
    user's Hugging Face cache here, as mlx-lm does (only its config and index when not whole:
    the nodes may fetch their own files); a folder, .gguf or the demo (None) as is."""
    from quantize.source import ModelRef, index_only, parse_repo_spec, resolve_ref

    if model is None or Path(model).expanduser().exists() or parse_repo_spec(model) is None:
        return ModelRef(None, None, Path(model).expanduser()) if model else None
    return resolve_ref(model) if whole else index_only(model)


def _across_ref(model: str | None, fetch: str, verify: bool) -> ModelRef | None:
    """The model for ranks on other Macs: for a repo id only its config and index here (the
    nodes fetch their own files) unless pushed, pinned at the commit read here, so that every
    node gets that very commit."""
    from dataclasses import replace

    from launcher.fetch import check_fetch, one_file_note
    from quantize.source import pinned

    check_fetch(fetch)
    ref = _model_ref(model, whole=fetch == "push")
    if ref is None or ref.repo is None:
        return ref
    note = one_file_note(ref)
    if note:
        typer.echo(note, err=True)
    return replace(pinned(ref), verify=verify)


def _launch_model(ref: ModelRef | None) -> Path:
    from mlxdist.cli.models import resolve_model
    from quantize.checkpoint import inspect_model
    from quantize.nodes import damaged_files, node_manifest

    path = resolve_model(str(ref.local_path) if ref else None)
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


def _check_mtp(path: Path, speculative: str) -> None:
    """Refuses, in one line before any rank starts, --speculative mtp for a model folder that
    holds no MTP layer it can draft with (nor has its drafting node folder one)."""
    if speculative != "mtp":
        return
    from launcher.mtpfolder import mtp_folder_problem

    problem = mtp_folder_problem(path)  # a damaged index is a CheckpointError: one line too
    if problem is not None:
        raise UserError(f"--speculative mtp: {path}: {problem}")


def _auto_here(
    path: Path,
    parallel: str,
    experts: str | None,
    split: str | None,
    local: int | None,
    context: int,
) -> str:
    """--parallel for ranks on this machine, auto resolved: --split means the pipeline,
    --experts expert mode, else the mode launcher/autoparallel.py predicts fastest for N ranks
    sharing this machine, said in one line before anything starts."""
    if parallel != "auto":
        return parallel
    if split or experts:
        return "pipeline" if split else "expert"
    from launcher.autoparallel import choose_local
    from launcher.hostfacts import collect
    from launcher.planner import node_spec_from_facts

    if local is not None and local < 1:
        raise UserError("--local needs at least 1 rank")
    machine = node_spec_from_facts("here", collect().to_dict())
    try:
        choice = choose_local(path, machine, local or 2, context)
    except ValueError as e:  # e.g. more ranks than layers: the launch itself says it
        typer.echo(f"auto: pipeline ({e})", err=True)
        return "pipeline"
    typer.echo(choice.line, err=True)
    return choice.mode


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
    from launcher.local import start_local
    from launcher.localview import view_here
    from quantize.checkpoint import inspect_model

    modes = dict(modes or {})
    modes.pop("ranks", None)
    api = modes.pop("api", None)
    kv = modes.pop("kv", None)
    num_layers = inspect_model(path).num_layers
    parts = _parse_split(split, ranks, num_layers) if not modes else [num_layers] * ranks
    what = f"layers {parts}" if not modes else f"{modes['parallel']} parallel"
    cache, said = _kv_here(path, parts, modes, kv)
    context = (kv or {}).get("context", 4096)
    view = view_here(path, modes.get("parallel", "pipeline"), parts, context)
    running = start_local(path, parts, port=port, api=api, view=view, **modes, **cache)
    return _loaded(running, path, len(parts), what + said)


def _kv_here(path: Path, parts: list[int], modes: dict, kv: dict | None) -> tuple[dict, str]:
    """start_local's kv_bits and prompt_cache_bytes for ranks on this machine (the budget, when
    not given, from the plan of these ranks on this machine's memory, with the MTP layer on the
    rank that drafts under --speculative mtp), with rank 0's speculative and draft_tokens as
    given, and the words the loading line says of them."""
    from launcher.promptbudget import describe, local_budget

    kv = dict(kv or {})
    context = kv.pop("context", 4096)
    kv.setdefault("kv_bits", None)
    if kv.get("prompt_cache_bytes") is None:
        parallel = modes.get("parallel", "pipeline")
        experts = modes.get("experts")
        speculative = kv.get("speculative", "none")
        kv["prompt_cache_bytes"] = local_budget(
            path, parts, parallel, experts, context, kv["kv_bits"], speculative
        )
    said = describe(kv["prompt_cache_bytes"], kv["kv_bits"])
    return kv, f"; {said}" if said else ""


def _loaded(running, path: Path, ranks: int, what: str):
    """The cluster once every rank has loaded; stopped if loading fails or is interrupted."""
    from launcher.local import wait_ready

    try:
        typer.echo(f"loading {path.name} on {ranks} ranks ({what})...", err=True)
        wait_ready(running)
    except BaseException:
        running.stop()
        raise
    return running


def _replan_here(
    path: Path, port: int | None, parallel: str, api: dict, failed, kv: dict | None = None
) -> object:
    """Local ranks again, one fewer than before (the failed rank's share spread over the rest);
    expert mode stays expert with the experts evened out, tensor mode falls back to layers."""
    from quantize.checkpoint import inspect_model
    from quantize.nodes import even_split

    ranks = len(failed.procs) - 1
    if ranks < 1:
        raise UserError("no rank remains to plan on: launch again")
    if parallel == "expert" and ranks > 1:
        return _start_here(path, ranks, None, port, {"parallel": "expert", "api": api, "kv": kv})
    split = even_split(inspect_model(path).num_layers, ranks)
    return _start_here(path, ranks, ",".join(map(str, split)), port, {"api": api, "kv": kv})


def _converse(
    running, prompt: str | None, chat: bool, params: dict, replan=None, headers=None
) -> None:
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
        except UserError as e:
            raise ClientError(str(e)) from None
        return current[0].url

    try:
        if prompt is not None:
            try:
                answer(running.url, prompt, chat, params, headers)
            except ClientError as e:
                if e.lost and (failure := cluster_failure(watch)):
                    raise UserError(f"the cluster failed: {failure}") from None
                raise
        else:
            again = relaunch if replan else None
            typer.echo(f"the cluster's dashboard: {running.url}/", err=True)
            repl(running.url, params, headers, watch=watch, relaunch=again)
    finally:
        current[0].stop()


@app.command()
def serve(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
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
    backend: str | None = typer.Option(None, help=BACKEND_HELP),
    parallel: str = typer.Option("auto", help=PARALLEL_HELP),
    fetch: str = typer.Option("auto", help=FETCH_HELP),
    verify: bool = typer.Option(False, "--verify", help=VERIFY_HELP),
    api_key: str | None = KEY_OPTION,
    api_key_file: Path | None = KEY_FILE_OPTION,
    insecure: bool = INSECURE_OPTION,
    max_body_mb: int = BODY_OPTION,
    docs: bool = DOCS_OPTION,
    allowed_host: list[str] = ALLOWED_HOST_OPTION,
    cors_origin: list[str] = CORS_OPTION,
    kv_bits: int | None = KV_BITS_OPTION,
    prompt_cache_bytes: str | None = PROMPT_CACHE_OPTION,
    speculative: str = SPECULATIVE_OPTION,
    draft_tokens: int | None = DRAFT_TOKENS_OPTION,
) -> None:
    """Run the cluster with its OpenAI-style HTTP API only, until Ctrl-C."""
    from mlxdist.cli.api_options import api_key as read_key
    from mlxdist.cli.api_options import api_settings, check_exposure

    try:
        kv = kv_settings(kv_bits, prompt_cache_bytes)
        kv |= speculative_settings(speculative, draft_tokens)  # rank 0's, carried along
        if hosts and (local or split or host or max_context):
            raise UserError("--local, --split, --host and --max-context are not for --hosts")
        key = read_key(api_key, api_key_file)  # first: an open API refused before any loading
        flag = "--hosts" if hosts else f"--host {host}"
        check_exposure(None if hosts else host or "127.0.0.1", key, insecure, flag)
        api = api_settings(key, max_body_mb, docs, allowed_host, cors_origin)
        parallel = _parallel(parallel)
        backend = _backend(backend, bool(hosts))
        ref = _across_ref(model, fetch, verify) if hosts else _model_ref(model)
        path = _launch_model(ref)
        check_kv_bits(path, kv["kv_bits"])
        _check_mtp(path, kv["speculative"])
        if hosts:
            from launcher.cluster import start_agents_cluster

            secret = _secret(secret_file)
            running = start_agents_cluster(
                path,
                hosts,
                None,
                [],
                secret,
                context,
                port,
                parallel,
                backend,
                fetch,
                ref,
                api,
                **kv,
            )
        else:
            parallel = _auto_here(path, parallel, None, split, local, context)
            modes = (
                _parallel_options(path, parallel, None, split, local)
                if parallel != "pipeline"
                else {}
            )
            where = (host or "127.0.0.1", port)
            kv["context"] = max_context or context
            running = _serve_here(path, local or 2, split, *where, max_context, modes, api, kv)
        _serve_until_stopped(running, path.name)
    except KeyboardInterrupt:
        typer.echo("\nstopped: every rank stopped", err=True)


def _serve_here(
    path: Path,
    ranks: int,
    split: str | None,
    host: str,
    port: int,
    max_context: int | None,
    modes: dict | None = None,
    api: dict | None = None,
    kv: dict | None = None,
):
    import os
    import socket

    from launcher.local import start_local
    from launcher.localview import view_here
    from quantize.checkpoint import inspect_model

    modes = {k: v for k, v in (modes or {}).items() if k != "ranks"}
    num_layers = inspect_model(path).num_layers
    parts = _parse_split(split, ranks, num_layers) if not modes else [num_layers] * ranks
    try:  # another server on the port would answer the readiness check in our place
        socket.create_server((host, port)).close()
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise UserError(f"cannot listen on {host}:{port}: {reason}") from None
    where = {"host": host, "port": port, "max_context": max_context, "api": api}
    context = (kv or {}).get("context", 4096)
    where["view"] = view_here(path, modes.get("parallel", "pipeline"), parts, context)
    cache, said = _kv_here(path, parts, modes, kv)
    running = start_local(path, parts, **where, **modes, **cache)
    what = f"layers {parts}" if not modes else f"{modes['parallel']} parallel"
    return _loaded(running, path, len(parts), what + said)


def _served_parallel(url: str, headers: dict | None = None) -> str:
    import httpx

    health = httpx.get(url + "/health", timeout=30, headers=headers or {}).json()
    return health.get("parallel", "pipeline")


def _rank_failure(running) -> str | None:
    return running.failure()


def _serve_until_stopped(running, name: str) -> None:
    import signal
    import time

    def stop(*_) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a service manager's stop, as Ctrl-C
    try:
        typer.echo(
            f"serving {name} at {running.url}/v1, its dashboard at {running.url}/ "
            "(Ctrl-C stops every rank)"
        )
        while (failure := _rank_failure(running)) is None:
            time.sleep(1.0)
        raise UserError(failure)
    finally:
        running.stop()


@app.command()
def bench(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    local: int | None = typer.Option(None, "--local", help="ranks on this machine (default 2)"),
    hosts: Path | None = typer.Option(None, help="hosts.toml: one rank per host, via agents"),
    secret_file: Path | None = typer.Option(None, "--secret-file", help="the cluster secret"),
    split: str | None = typer.Option(None, help="layers per rank, e.g. 10,20 (--local)"),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", min=1, help="prompt length"),
    decode_tokens: int = typer.Option(64, "--decode-tokens", min=2, help="tokens to answer"),
    streams: int = typer.Option(4, min=1, help="concurrent streams for the aggregate figure"),
    conversation_tokens: int = typer.Option(
        400, "--conversation-tokens", min=0, help="a follow-up turn's first turn (0: skip)"
    ),
    long_prompt_tokens: int = typer.Option(
        2048, "--long-prompt-tokens", min=0, help="prefill speed of a long prompt (0: skip)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the figures as JSON"),
    parallel: str = typer.Option("auto", help=PARALLEL_HELP),
    experts: str | None = typer.Option(None, help="routed experts per rank, e.g. 3,3,2 (expert)"),
    backend: str | None = typer.Option(None, help=BACKEND_HELP),
    fetch: str = typer.Option("auto", help=FETCH_HELP),
    verify: bool = typer.Option(False, "--verify", help=VERIFY_HELP),
    kv_bits: int | None = KV_BITS_OPTION,
    prompt_cache_bytes: str | None = PROMPT_CACHE_OPTION,
    speculative: str = SPECULATIVE_OPTION,
    draft_tokens: int | None = DRAFT_TOKENS_OPTION,
) -> None:
    """Start the cluster, measure prompt and decode speed, a follow-up turn, a long prompt,
    memory and traffic, then stop it."""
    from mlxdist.client.bench import bench as measure
    from mlxdist.client.bench import render

    try:
        kv = kv_settings(kv_bits, prompt_cache_bytes)
        kv |= speculative_settings(speculative, draft_tokens)  # rank 0's, carried along
        if hosts and (local or split):
            raise UserError("--local and --split are for one machine; not with --hosts")
        if hosts and experts:
            raise UserError("--experts is for --local; across hosts the expert node folders decide")
        parallel = _parallel(parallel)
        backend = _backend(backend, bool(hosts))
        ref = _across_ref(model, fetch, verify) if hosts else _model_ref(model)
        path = _launch_model(ref)
        check_kv_bits(path, kv["kv_bits"])
        _check_mtp(path, kv["speculative"])
        if hosts:
            from launcher.cluster import start_agents_cluster

            secret = _secret(secret_file)
            # The API listens on a cluster address: a key made here, known to this bench alone.
            api = _launch_api(True, None, None, False, DEFAULT_BODY_MB, False, [], [])
            headers = {"Authorization": f"Bearer {api['api_key']}"}
            running = start_agents_cluster(
                path, hosts, None, [], secret, 4096, None, parallel, backend, fetch, ref, api, **kv
            )
        else:
            headers = {}
            parallel = _auto_here(path, parallel, experts, split, local, 4096)
            modes = _parallel_options(path, parallel, experts, split, local) | {"kv": kv}
            running = _start_here(path, local or modes.get("ranks", 2), split, None, modes)
        try:
            if parallel == "auto":  # the launcher chose across the hosts: the ranks say what
                parallel = _served_parallel(running.url, headers)
            result = measure(
                running.url,
                prompt_tokens=prompt_tokens,
                decode_tokens=decode_tokens,
                streams=streams,
                parallel=parallel,
                headers=headers,
                conversation_tokens=conversation_tokens,
                long_prompt_tokens=long_prompt_tokens,
            )
        finally:
            running.stop()
    except KeyboardInterrupt:
        typer.echo("\ninterrupted: every rank stopped", err=True)
        raise typer.Exit(130) from None
    if as_json:
        typer.echo(result.to_json())
    else:
        from rich.console import Console

        render(result, Console(width=200, soft_wrap=True))
