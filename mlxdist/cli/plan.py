"""`mlxdist plan`: which node holds which layers, as a table or JSON.

Over real nodes (--cluster, --hosts) the plan decides as `mlxdist launch` does, through the same
functions (launcher/cluster.py): the ring along the cables, the backend from the nodes' facts,
the link that gives, the folder's readiness and the auto choice. --simulate predicts over --link.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from mlxdist.cli.app import app
from quantize.errors import UserError

if TYPE_CHECKING:
    from launcher.cluster import Decision
    from launcher.planner import ModelSpec, NodeSpec, Plan
    from launcher.remote import Node

# Seconds to wait for each agent of a hosts.toml: a plan is a quick look, not a launch.
AGENT_TIMEOUT = 3.0


@app.command("plan")
def plan_cmd(
    model: str = typer.Argument(
        ..., help="model folder, a bare config.json or a Hugging Face repo id org/name[@revision]"
    ),
    hosts: Path | None = typer.Option(None, help="hosts.toml with each host's memory_gb"),
    simulate: str | None = typer.Option(None, help='a cluster that is not here, e.g. "6x192GB"'),
    cluster: str | None = typer.Option(None, help="the agents of this cluster, found by zeroconf"),
    interface: list[str] = typer.Option([], help="interface to discover agents on (--cluster)"),
    context: int = typer.Option(4096, min=1, help="tokens of context to hold in the KV cache"),
    batch: int = typer.Option(1, min=1, help="sequences decoded at once"),
    bits: int = typer.Option(4, help="width planned for a model not yet quantised"),
    as_json: bool = typer.Option(False, "--json", help="the plan as JSON (for quantize --plan)"),
    link: str | None = typer.Option(
        None,
        help="link for the prediction: tb5, tb4, rdma or lan (default: --simulate tb5; real "
        "nodes: the link their backend gives, as launch decides it)",
    ),
    parallel: str = typer.Option(
        "auto",
        help="auto (the mode predicted fastest), pipeline (layers), expert (experts) or tensor "
        "(1/N of every layer: predicted, with whether it fits)",
    ),
    backend: str | None = typer.Option(
        None, help="ring, jaccl, jaccl-ring or auto, as for launch (--cluster, --hosts)"
    ),
    secret_file: Path | None = typer.Option(
        None, "--secret-file", help="the cluster secret, to ask the agents (--cluster, --hosts)"
    ),
    kv_bits: int | None = typer.Option(
        None, "--kv-bits", help="KV cache quantised to 4 or 8 bits, as launch --kv-bits runs it"
    ),
    speculative: str = typer.Option(
        "none",
        "--speculative",
        help="none, ngram or mtp, as launch --speculative runs it (mtp: the MTP layer counted "
        "on the rank that drafts)",
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
            backend=backend,
            secret_file=secret_file,
            kv_bits=kv_bits,
            speculative=speculative,
        )
    except ValueError as e:  # plan_command's faults: the options, the hosts file, the model
        raise UserError(str(e)) from None
    raise typer.Exit(code)


@dataclass
class FoundNodes:
    """Real nodes as a launch finds them (their facts from their agents), and what a plan
    noticed on the way that a launch would not get past."""

    nodes: list[Node]
    keep_order: bool  # hosts.toml's order (launch --hosts); else along the cables
    backend: str  # the backend asked: --backend, else hosts.toml's, else auto
    notes: list[str] = field(default_factory=list)


def nodes_from_hosts(path: str | Path) -> list[NodeSpec]:
    """Nodes in rank order from a hosts.toml alone, each with its memory_gb (GB as Apple sells
    them), as a launch plans a host that runs no agent."""
    from launcher.cluster import _specs

    return _specs(hosts_nodes(path, None).nodes)


def hosts_nodes(path: str | Path, secret: bytes | None, backend: str | None = None) -> FoundNodes:
    """The hosts of a hosts.toml as launch --hosts takes them: each with the facts its agent
    reports (asked at once, AGENT_TIMEOUT each), memory_gb where given; a host whose agent does
    not answer (or with no secret to ask) is planned from its memory_gb, without its cables."""
    from launcher.hosts import read_hosts
    from launcher.remote import Node

    hosts = read_hosts(path)
    notes = []
    if secret is None:
        answers: list[dict | str] = ["no cluster secret to ask its agent"] * len(hosts.hosts)
        notes.append(f"no cluster secret: planned from {path} alone, without the nodes' cables")
    else:
        with ThreadPoolExecutor(max_workers=max(1, len(hosts.hosts))) as pool:
            answers = list(pool.map(lambda h: _agent_facts(h, secret), hosts.hosts))
    nodes = []
    for h, answer in zip(hosts.hosts, answers):
        facts = answer if isinstance(answer, dict) else {}
        if not facts:
            if h.memory_gb is None:
                raise ValueError(
                    f"host {h.name} has no memory_gb in {path} and {answer}: start mlxdist agent "
                    "there, or give its memory, e.g. memory_gb = 192"
                )
            if secret is not None:
                stop = "" if h.ssh else "; a launch stops here (no ssh destination either)"
                notes.append(f"{h.name}: {answer}: planned from its memory_gb{stop}")
        if h.memory_gb is not None:  # as launch: the hosts file's memory stands
            facts["memory_total"] = facts["memory_available"] = int(h.memory_gb * 2**30)
        nodes.append(Node(h.name, h.address, None, facts, ssh=h.ssh))  # type: ignore[arg-type]
    return FoundNodes(nodes, True, backend or hosts.backend, notes)


def _agent_facts(host, secret: bytes) -> dict | str:
    """The facts the host's agent reports, or why it gave none."""
    from launcher.agent_client import AgentClient, AgentError
    from launcher.rankspec import AGENT_PORT

    url = f"http://{host.address}:{host.agent_port or AGENT_PORT}"
    try:
        with AgentClient(url, secret, timeout=AGENT_TIMEOUT) as client:
            return client.facts()
    except AgentError as e:
        return f"its agent did not answer ({e})"


def cluster_nodes(
    cluster: str, interfaces: list[str], secret: bytes, backend: str | None = None
) -> FoundNodes:
    """The agents of a cluster that zeroconf finds, with the facts each reports."""
    from launcher.cluster import discover_nodes

    found = discover_nodes(cluster, interfaces, secret)
    if not found:
        raise ValueError(f"no agent of cluster {cluster!r} answered on the interfaces given")
    return FoundNodes(found, False, backend or "auto")


def _secret(path: Path | None, needed: bool) -> bytes | None:
    from launcher.secret import SecretError, load_secret

    try:
        return load_secret(path)
    except SecretError:
        if needed or path is not None:
            raise
        return None


@dataclass
class Decided:
    """A plan's nodes in rank order and what it prints beside the tables."""

    nodes: list[NodeSpec]
    decision: Decision
    lines: list[str]  # cable setup, the backend's line and its setup commands, the auto line
    notes: list[str]


def decide_on_nodes(
    model: str, found: FoundNodes, parallel: str, context: int, bits: int, link: str | None
) -> Decided:
    """What a launch on these nodes would run, decided by launch's own functions: the ring
    along the cables, the backend, where the ring runs and its link (unless `link` overrides
    it), the folder's readiness and the auto choice. Where a launch would stop (no ring through
    the cables, cables without addresses), the plan says so and goes on."""
    from rich.console import Console

    from launcher.cluster import _specs, cable_addresses, decide, ring
    from launcher.local import LaunchError

    notes = list(found.notes)
    try:
        nodes = ring(found.nodes, keep_order=found.keep_order)
    except LaunchError as e:
        notes.append(f"{e}; a launch stops here, the plan takes the nodes by name")
        nodes = sorted(found.nodes, key=lambda n: n.name)
    said, commands = io.StringIO(), io.StringIO()
    console = Console(file=said, width=100, soft_wrap=True)
    decision = decide(Path(model), nodes, found.backend, parallel, context, console, link, bits)
    lines = []
    if decision.over_cables:
        try:
            cable_addresses(nodes, Console(file=commands, width=100, soft_wrap=True))
        except LaunchError as e:  # the commands that give each cable its /30, then why
            lines = commands.getvalue().splitlines() + [f"note: {e}"]
    return Decided(_specs(nodes), decision, lines + said.getvalue().splitlines(), notes)


def _plan_model(model: str) -> str:
    """The model to plan as a local path. A Hugging Face repo id (org/name[@revision]) is
    fetched into the user's cache with only config.json and its safetensors index, no weights;
    a folder or a bare config.json is planned as it is."""
    from quantize.source import index_only, parse_repo_spec

    if Path(model).expanduser().exists() or parse_repo_spec(model) is None:
        return model
    ref = index_only(model)
    _say_estimated(ref.label, ref.local_path)
    return str(ref.local_path)


def _say_estimated(label: str, folder: Path) -> None:
    """One line on stderr when an already quantised repo is planned from its config: its
    per-layer sizes are estimated, as its safetensors headers could not be read (offline)."""
    from quantize.checkpoint import read_config
    from quantize.source import snapshot_headers

    if "quantization" not in read_config(folder) or any(folder.glob("*.safetensors")):
        return
    if snapshot_headers(folder) is not None:  # exact; kept for the planner in this process
        return
    index = folder / "model.safetensors.index.json"
    meta = json.loads(index.read_text()).get("metadata") or {} if index.is_file() else {}
    total = meta.get("total_size")
    whole = f"; its index gives {total / 1e9:.1f} GB in all" if total else ""
    what = "its weights' sizes per layer are estimated"
    typer.echo(f"note: {label} planned from config.json: {what}{whole}", err=True)


def _holds_weights(path: Path) -> bool:
    """A folder with safetensors weights, or a repo's snapshot (a repo id is planned from its
    config and index alone: its weights are on the Hub)."""
    from quantize.source import repo_of_snapshot

    return path.is_dir() and (any(path.glob("*.safetensors")) or bool(repo_of_snapshot(path)))


def _bits_for_choice(model: str, bits: int) -> int | None:
    """A folder that holds weights is taken as stored, as its launch runs it; a model still to
    be quantised (a bare config.json, a folder without weights) at --bits."""
    return None if _holds_weights(Path(model)) else bits


def plan_command(
    model: str,
    hosts: str | None,
    simulate: str | None,
    context: int,
    batch: int,
    bits: int,
    as_json: bool,
    link: str | None = None,
    parallel: str = "pipeline",
    cluster: str | None = None,
    interfaces: list[str] | None = None,
    backend: str | None = None,
    secret_file: Path | None = None,
    kv_bits: int | None = None,
    speculative: str = "none",
) -> int:
    """Prints the plan (layers per node, or experts per node with parallel="expert") and the
    predicted decode speed; with parallel="auto" also the mode predicted fastest
    (launcher/autoparallel.py), and the plan of that mode (a tensor mode shows the pipeline's
    table beside its own line). --simulate predicts over `link` (tb5 unless given); real nodes
    (--hosts, --cluster) over the link launch would use, unless `link` is given. 0 when the
    model fits, 1 when it does not. Faults raise ValueError (or a UserError)."""
    from launcher.autoparallel import check_parallel

    check_parallel(parallel)
    if sum(x is not None for x in (hosts, simulate, cluster)) != 1:
        raise ValueError(
            "give exactly one of --hosts FILE and --simulate, e.g. --simulate 6x192GB, "
            "or --cluster NAME"
        )
    if backend is not None and simulate is not None:
        raise ValueError(
            "--backend is for real nodes (--hosts, --cluster): --simulate takes --link"
        )
    _check_link(link)
    _check_speculative(speculative)
    model = _plan_model(model)
    _check_kv_bits(model, kv_bits)
    launch = {"kv_bits": kv_bits, "speculative": speculative}
    if simulate is not None:
        return simulated_plan(
            model, simulate, context, batch, bits, as_json, link, parallel, **launch
        )
    if cluster is not None:
        found = cluster_nodes(cluster, interfaces or [], _secret(secret_file, True), backend)
    else:
        found = hosts_nodes(str(hosts), _secret(secret_file, False), backend)
    return plan_nodes(model, found, context, batch, bits, as_json, link, parallel, **launch)


def _check_speculative(speculative: str) -> None:
    from launcher.rankspec import SPECULATIVE

    if speculative not in SPECULATIVE:
        names = f"{', '.join(SPECULATIVE[:-1])} or {SPECULATIVE[-1]}"
        raise ValueError(f"--speculative takes {names}, not {speculative!r}")


def _mtp_notes(model: str, speculative: str) -> list[str]:
    """Why a launch of this folder with --speculative mtp would stop, when it would."""
    from launcher.mtpfolder import mtp_folder_problem

    if speculative != "mtp" or not _holds_weights(Path(model)):
        return []
    problem = mtp_folder_problem(Path(model))
    return [f"--speculative mtp: {problem}: a launch of it stops there"] if problem else []


def _check_kv_bits(model: str, kv_bits: int | None) -> None:
    """--kv-bits 4 or 8, for a model whose caches mlx-lm can quantise (else ValueError)."""
    from launcher.kvbits import check_kv_bits
    from quantize.checkpoint import CheckpointError, read_config

    if kv_bits is None:
        return
    try:
        config = read_config(model)
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    check_kv_bits(config, kv_bits)


def _check_link(link: str | None) -> None:
    from launcher import perfmodel

    if link is not None:
        perfmodel.link(link)  # an unknown link is the user's fault, found before any work


def simulated_plan(
    model: str,
    simulate: str,
    context: int,
    batch: int,
    bits: int,
    as_json: bool,
    link: str | None = None,
    parallel: str = "pipeline",
    kv_bits: int | None = None,
    speculative: str = "none",
) -> int:
    """The plan on a cluster that is not here, over `link` (tb5 unless given)."""
    from launcher.planner import simulated_nodes

    link = link or "tb5"
    _check_link(link)
    nodes = simulated_nodes(simulate)
    spec = _model_spec(model, bits, kv_bits, speculative)
    choice = (
        auto_choice(model, bits, nodes, spec, link, context, batch) if parallel == "auto" else None
    )
    mode = choice.mode if choice else ("pipeline" if parallel == "auto" else parallel)
    lines = [choice.line] if choice else []
    notes = _mtp_notes(model, speculative)
    args = (model, bits, nodes, spec, mode, link, lines, notes, context, batch, as_json, choice)
    return report(*args, kv_bits=kv_bits)


def plan_nodes(
    model: str,
    found: FoundNodes,
    context: int,
    batch: int,
    bits: int,
    as_json: bool,
    link: str | None = None,
    parallel: str = "auto",
    kv_bits: int | None = None,
    speculative: str = "none",
) -> int:
    """The plan on real nodes, decided as launch decides (decide_on_nodes); `link` overrides
    the link launch would use."""
    _check_link(link)
    spec = _model_spec(model, bits, kv_bits, speculative)
    asked = parallel if parallel != "auto" or _countable(model, bits) else "pipeline"
    got = decide_on_nodes(model, found, asked, context, _bits_for_choice(model, bits), link)
    d = got.decision
    extra = {
        "backend": {
            "backend": d.backend.backend,
            "why": d.backend.why,
            "over_cables": d.over_cables,
            "link": d.link,
        }
    }
    return report(
        model,
        bits,
        got.nodes,
        spec,
        d.parallel,
        d.link,
        got.lines,
        got.notes + _mtp_notes(model, speculative),
        context,
        batch,
        as_json,
        d.auto,
        extra,
        kv_bits=kv_bits,
    )


def _model_spec(
    model: str, bits: int, kv_bits: int | None = None, speculative: str = "none"
) -> ModelSpec:
    from launcher.planner import model_spec_from_folder
    from quantize.checkpoint import CheckpointError
    from quantize.source import repo_of_snapshot

    try:
        spec = model_spec_from_folder(model, bits=bits, kv_bits=kv_bits, speculative=speculative)
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    repo = repo_of_snapshot(Path(model))  # a repo's snapshot is named by its commit
    return replace(spec, name=repo[0]) if repo else spec


def _countable(model: str, bits: int) -> bool:
    """Whether the model's architecture can be built to count its bytes (an auto choice needs
    it; without, the plan stays a pipeline)."""
    from launcher import perfmodel
    from quantize.checkpoint import CheckpointError, read_config

    try:
        perfmodel.bytes_per_token(read_config(model), bits=bits)
    except (CheckpointError, ValueError, KeyError, ImportError):
        return False
    return True


def report(
    model: str,
    bits: int,
    nodes: list[NodeSpec],
    spec: ModelSpec,
    mode: str,
    link: str,
    lines: list[str],
    notes: list[str],
    context: int,
    batch: int,
    as_json: bool,
    choice=None,
    extra: dict | None = None,
    kv_bits: int | None = None,
) -> int:
    """Prints the plan of `mode` (a tensor mode: the pipeline's table and tensor's own line),
    the prediction over `link`, the notes, then `lines` (the backend's and the auto choice's).
    0 when `mode` fits, 1 when it does not."""
    from launcher.planner import plan, plan_experts, plan_to_json

    planner = plan_experts if mode == "expert" else plan
    result = planner(nodes, spec, context=context, batch=batch)
    forecast = predict_for_plan(model, bits, nodes, spec, result, link)
    notes = notes + _readiness(model, mode, len(nodes)) + _files_note(mode)
    fits, tensor = result.fits, None
    if mode == "tensor":
        tensor = tensor_outcome(model, bits, nodes, link, context, batch, choice)
        fits = tensor.runs
    if as_json:
        out = {**plan_to_json(result), "kv_bits": kv_bits, "prediction": forecast}
        out |= extra or {}
        if choice is not None:
            out["choice"] = {"mode": mode, "line": choice.line}
        if tensor is not None:
            out["tensor"] = {
                "fits": tensor.fits,
                "tokens_per_s": tensor.tokens_per_s,
                "why_not": tensor.why_not,
                "line": tensor_line(tensor, len(nodes)),
            }
        out["notes"] = notes
        print(json.dumps(out, indent=2))
        return 0 if fits else 1
    console = Console()
    if not console.is_terminal:
        console.width = 100  # a pipe or a log: no terminal to fit
    print_plan(result, console, kv_bits)
    print_prediction(forecast, console)
    for note in result.notes + notes:
        console.print(f"note: {note}", soft_wrap=True, highlight=False)
    if tensor is not None:
        style = None if tensor.runs else "red"
        console.print(tensor_line(tensor, len(nodes)), style=style, soft_wrap=True, highlight=False)
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False)
    return 0 if fits else 1


def _files_note(mode: str) -> list[str]:
    """Says plainly when every node needs the whole model (launcher/nodefiles.py)."""
    from launcher.nodefiles import every_file_note

    return [every_file_note(mode)] if mode == "tensor" else []


def _readiness(model: str, mode: str, nodes: int) -> list[str]:
    """Why a launch of this folder cannot run `mode` as it is cut, if it cannot."""
    from launcher.autoparallel import folder_readiness

    if not _holds_weights(Path(model)):
        return []
    why = folder_readiness(Path(model), nodes).get(mode)
    return [f"the folder is {why}: a launch of it cannot run {mode} mode"] if why else []


def tensor_outcome(model, bits, nodes, link, context, batch, choice=None):
    """Tensor parallelism on these nodes: whether it can run and fits, and its prediction (the
    auto choice's when there is one, so both say the same)."""
    from launcher.autoparallel import mode_outcome, model_inputs

    if choice is not None:
        return next(o for o in choice.outcomes if o.mode == "tensor")
    if len(nodes) < 2:
        raise ValueError("--parallel tensor needs 2 nodes or more")
    try:
        spec, active, refusal = model_inputs(Path(model), len(nodes), _bits_for_choice(model, bits))
    except (ValueError, KeyError, ImportError) as e:
        raise ValueError(f"cannot predict tensor parallelism for {model}: {e}") from None
    return mode_outcome("tensor", nodes, spec, active, link, context, batch, refusal=refusal)


def tensor_line(o, nodes: int) -> str:
    if o.tokens_per_s is None:
        return f"tensor: {o.why_not}"
    share = f"1/{nodes} of every layer on each node"
    verdict = "fits" if o.fits else "does not fit"
    return f"tensor parallel over {o.link}: {share} {verdict}, {o.tokens_per_s:.1f} tok/s predicted"


def auto_choice(
    model: str,
    bits: int,
    nodes: list[NodeSpec],
    spec: ModelSpec,
    link: str,
    context: int,
    batch: int,
):
    """The mode `--parallel auto` picks for these simulated nodes over `link`; None when the
    model's architecture cannot be built to count its bytes (the plan then stays a pipeline)."""
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


def print_plan(p: Plan, console: Console, kv_bits: int | None = None) -> None:
    """The plan as a table of nodes, and its verdict in one line: a pipeline split, or each
    node's routed experts (expert parallelism, with the activations it holds), and the prompt
    cache's default budget when it fits."""
    from launcher.planner import DEFAULT_HEADROOM, PROMPT_CACHE_SHARE

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
    if kv_bits:
        title += f", KV cache {kv_bits}-bit"
    if p.mtp_bytes:
        drafter = p.order[0] if expert else p.order[-1]
        title += f", MTP layer {_gb(p.mtp_bytes)} GB on {drafter}"
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
    if p.fits:
        line += (
            f"; prompt cache {p.prompt_cache_bytes / 1e9:.2f} GB per node "
            f"({PROMPT_CACHE_SHARE:.0%} of the least left after a prefill's activations)"
        )
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
