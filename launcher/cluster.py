"""A cluster of agents for `mlxdist launch` and `status`: found, ordered, planned, started."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from launcher.agent_client import AgentClient, AgentError
from launcher.autoparallel import (
    Choice,
    check_parallel,
    choose_for_nodes,
    holds_whole_model,
    link_for,
)
from launcher.backend import BackendChoice, BackendError, choose_backend
from launcher.clusterview import launch_view, view_text
from launcher.discovery import CollisionError, browse, verified
from launcher.fetch import (
    check_fetch,
    choose_fetch,
    hub_fetch,
    hub_shares,
    missing_bytes,
    pin_commit,
    repo_sizes,
    whole_model,
)
from launcher.hostfacts import ThunderboltPort
from launcher.hosts import read_hosts
from launcher.interfaces import listen_addresses
from launcher.local import LaunchError
from launcher.modes import check_tensor_split
from launcher.nodefiles import every_file_note
from launcher.planner import (
    NodeSpec,
    model_spec_from_folder,
    plan,
    plan_experts,
    tensor_held_bytes,
)
from launcher.rankspec import AGENT_PORT, DRAFT_TOKENS
from launcher.remote import Node, expert_folders, node_folders
from launcher.ssh import SshClient
from launcher.topology import (
    cable_graph,
    explain_no_ring,
    ring_addresses,
    ring_order,
    setup_commands,
)
from quantize.checkpoint import CheckpointError, read_config


def _with_facts(nodes: list[Node]) -> list[Node]:
    for node in nodes:
        try:
            node.facts = node.client.facts()
        except AgentError as e:
            raise LaunchError(f"the agent on {node.name} ({node.address}) refused: {e}") from None
    return nodes


def discover_nodes(
    cluster: str,
    interfaces: list[str],
    secret: bytes,
    timeout: float = 3.0,
    addresses: list[str] | None = None,
) -> list[Node]:
    """The agents of this cluster that zeroconf finds on these interfaces' addresses and that
    prove, in a signed hello, they know the secret (any other announcement is left out).
    addresses: the interfaces' own, when known (else read from this machine's facts)."""
    from launcher.hostfacts import collect

    if addresses is None:
        addresses = listen_addresses(collect(), interfaces)
    notes: list[str] = []
    try:
        agents = verified(browse(cluster, addresses, timeout, notes), secret, notes=notes)
    except CollisionError as e:
        raise LaunchError(str(e)) from None
    for line in notes:  # announcements that did not prove themselves: why each is left out
        print(line, file=sys.stderr)
    nodes = [Node(a.node_id, a.addresses[0], client) for a, client in agents]
    _with_facts(nodes)
    # Facts unlike the advertised digest are stale (the agent restarted, or zeroconf kept an old
    # advertisement): ask once more; the signed answer stands.
    _with_facts([n for n, (a, _) in zip(nodes, agents) if not a.advertised(n.facts)])
    # Named by the host name in the signed facts, not the advertisement's, which anyone can make.
    names = [str(n.facts.get("hostname") or n.client.node_id) for n in nodes]
    # Hosts may share a name (cloned machines); the node id tells them apart.
    for node, name in zip(nodes, names):
        node.name = f"{name}-{node.client.node_id[:6]}" if names.count(name) > 1 else name
    return nodes


def _refuse_collisions(nodes: list[Node]) -> None:
    """Two hosts whose agents prove one node id from two starts (two processes, a cloned disk):
    both refused, in one line naming them. One agent reached at two addresses is one agent."""
    seen: dict[str, Node] = {}
    for node in nodes:
        node_id = getattr(node.client, "node_id", None)  # None: a host reached over ssh
        if node_id is None:
            continue
        if node_id in seen and seen[node_id].client.boot_id != node.client.boot_id:
            first = seen[node_id]
            raise LaunchError(
                f"two agents answer as node {node_id}: {first.name} ({first.address}) and "
                f"{node.name} ({node.address}); on one of them remove ~/.mlxdist/node_id and "
                "restart its agent"
            )
        seen[node_id] = node


def nodes_from_hosts(path: Path, secret: bytes) -> list[Node]:
    """Hosts of a hosts.toml: through their agents, or over ssh where no agent answers."""
    hosts = read_hosts(path)
    nodes = []
    for h in hosts.hosts:
        url = f"http://{h.address}:{h.agent_port or AGENT_PORT}"
        node = Node(h.name, h.address, AgentClient(url, secret), ssh=h.ssh)
        try:
            node.facts = node.client.facts()
        except AgentError as e:
            if h.ssh is None:
                raise LaunchError(
                    f"the agent on {h.name} ({h.address}) did not answer ({e}): start "
                    "mlxdist agent there, or give the host an ssh destination in the hosts file"
                ) from None
            if h.memory_gb is None:
                raise LaunchError(f"{h.name} runs no agent: give its memory_gb in {path}") from None
            node.client = SshClient(h.ssh)
        nodes.append(node)
    for h, node in zip(hosts.hosts, nodes):
        if h.memory_gb is not None:
            node.facts["memory_total"] = int(h.memory_gb * 2**30)
            node.facts["memory_available"] = int(h.memory_gb * 2**30)
    _refuse_collisions(nodes)
    return nodes


def _ports(nodes: list[Node]) -> dict[str, list[ThunderboltPort]]:
    return {
        n.name: [ThunderboltPort.from_dict(p) for p in n.facts.get("thunderbolt", [])]
        for n in nodes
    }


def _own_node_id() -> str | None:
    from launcher.secret import config_dir

    path = config_dir() / "node_id"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _order_key(own: str | None):
    """Where a discovered node stands: the launcher's own host first (when it runs an agent),
    then by node id, each from the agent's signed hello, never from a name in an advertisement
    (which anyone can make). Only agents that proved the secret are here at all, and a node id
    is stable across restarts, so each node keeps its layers (and the shards it holds)."""

    def key(node: Node) -> tuple[bool, str]:
        node_id = getattr(node.client, "node_id", None) or ""
        return (node_id != own, node_id)

    return key


def ring(nodes: list[Node], keep_order: bool) -> list[Node]:
    """Rank order: as the hosts file gives it; else along the Thunderbolt cables when the nodes
    report them, from the first node by _order_key towards its lesser neighbour; else by
    _order_key alone."""
    if keep_order:
        return nodes
    key = _order_key(_own_node_id())
    ports = _ports(nodes)
    if not any(ports.values()):
        return sorted(nodes, key=key)
    links = cable_graph(ports)
    order = ring_order(sorted(ports), links)
    if order is None:
        raise LaunchError(f"no ring follows the cables: {explain_no_ring(sorted(ports), links)}")
    by_name = {n.name: n for n in nodes}
    cycle = [by_name[name] for name in order]
    start = cycle.index(min(cycle, key=key))
    cycle = cycle[start:] + cycle[:start]
    if len(cycle) > 2 and key(cycle[-1]) < key(cycle[1]):
        cycle = cycle[:1] + cycle[:0:-1]  # the same ring walked the other way
    return cycle


def cable_addresses(nodes: list[Node], console) -> list[list[str]] | None:
    """Each rank's ring addresses on its cables, or None when the nodes report no cables.

    Cables without a /30 of their own: the macOS commands that give them one are printed.
    """
    ports = _ports(nodes)
    if len(nodes) < 2 or not all(ports.values()):
        return None
    order = [n.name for n in nodes]
    links = cable_graph(ports)
    addresses = {n.name: n.facts.get("addresses", {}) for n in nodes}
    found = ring_addresses(order, links, addresses)
    if found.missing:
        for host, commands in setup_commands(order, links, addresses=addresses).items():
            console.print(f"on {host}:\n  " + "\n  ".join(commands))
        cables = ", ".join(str(link) for link in found.missing)
        raise LaunchError(
            f"these cables have no addresses of their own: {cables}; run the commands above "
            "on each Mac (they are lost on reboot), then launch again"
        )
    return found.ips


def choose_nodes_backend(nodes: list[Node], asked: str, console) -> BackendChoice:
    """The backend for these nodes in rank order, its reason printed in one line; the setup
    commands that jaccl needs are printed (never run) when there are any."""
    ports = _ports(nodes)
    links = cable_graph(ports) if any(ports.values()) else []
    facts = {n.name: n.facts for n in nodes}
    try:
        choice = choose_backend([n.name for n in nodes], facts, links, asked)
    except BackendError as e:
        _print_setup(e.setup, console)
        raise
    console.print(choice.why)
    _print_setup(choice.setup, console)
    return choice


def _print_setup(setup: dict[str, list[str]], console) -> None:
    for host, commands in setup.items():
        console.print(f"on {host}:\n  " + "\n  ".join(commands))


def over_cables(nodes: list[Node], backend: str) -> bool:
    """Whether the ring runs over the cables' own /30s (every node reports its cables), rather
    than over the hosts' own addresses."""
    return backend == "ring" and len(nodes) > 1 and all(_ports(nodes).values())


@dataclass(frozen=True)
class Decision:
    """What a launch on these nodes runs, as launch and plan both decide it."""

    backend: BackendChoice
    over_cables: bool  # the ring on the cables' /30s (cable_addresses gives them)
    link: str  # what the prediction sends over (perfmodel.LINKS)
    parallel: str  # the mode to run
    auto: Choice | None  # --parallel auto's choice, when asked


def decide(
    model: Path,
    nodes: list[Node],
    asked: str,
    parallel: str,
    context: int,
    console,
    link: str | None = None,
    bits: int | None = None,
) -> Decision:
    """The backend for these nodes in rank order (its line printed), where the ring runs, the
    link that gives (unless `link` names one), and with parallel "auto" the mode predicted
    fastest (its line printed). bits: a plan's width for a model not yet quantised."""
    check_parallel(parallel)
    chosen = choose_nodes_backend(nodes, asked, console)
    cables = over_cables(nodes, chosen.backend)
    link = link or link_for(chosen.backend, cables)
    pick = None
    if parallel == "auto":  # the mode the performance model predicts fastest on these links
        pick = choose_for_nodes(model, _specs(nodes), link, context, bits)
        console.print(pick.line, highlight=False)
    return Decision(chosen, cables, link, pick.mode if pick else parallel, pick)


def _specs(nodes: list[Node]) -> list[NodeSpec]:
    """What the planner needs of each node: its name, memory, chip and GPU memory limit."""
    from launcher.planner import node_spec_from_facts

    return [node_spec_from_facts(n.name, n.facts) for n in nodes]


def choose_split(
    model: Path,
    nodes: list[Node],
    context: int,
    whole: bool = False,
    kv_bits: int | None = None,
    speculative: str = "none",
) -> list[int]:
    """The split the model's node folders were cut for; it must fit the nodes' memory (with
    the KV cache at kv_bits when given, and the MTP layer on the last node when speculative is
    "mtp").
    whole: a Hugging Face repo, which no one cut: the planned split, each node getting the
    files that hold its layers."""
    specs = _specs(nodes)
    spec = model_spec_from_folder(model, kv_bits=kv_bits, speculative=speculative)
    planned = plan(specs, spec, context=context)
    cut = node_folders(model, len(nodes))
    if cut is None and whole and planned.fits:
        return planned.split
    if cut is None:
        raise LaunchError(
            f"{model} has no node folders for {len(nodes)} nodes: cut them with "
            f"mlxdist quantize {model} {model}-{len(nodes)}n --split "
            f"{','.join(map(str, planned.split))}, then launch that folder"
        )
    if not planned.fits:
        raise LaunchError(f"the model {planned.message}")
    return cut


def choose_experts(
    model: Path,
    nodes: list[Node],
    context: int,
    whole: bool = False,
    kv_bits: int | None = None,
    speculative: str = "none",
) -> list[int]:
    """The routed experts per node the model's expert node folders were cut for; the plan
    (replicated weights, those experts and the whole KV cache on every node, the MTP layer on
    node 0 when speculative is "mtp") must fit.
    whole: as in choose_split (every node then gets every file); so does a folder holding the
    whole model, from which each rank reads only its own experts."""
    specs = _specs(nodes)
    spec = model_spec_from_folder(model, kv_bits=kv_bits, speculative=speculative)
    planned = plan_experts(specs, spec, context=context)
    cut = expert_folders(model, len(nodes))
    if cut is None and (whole or holds_whole_model(model)):
        if not planned.fits:
            raise LaunchError(f"the model {planned.message}")
        return planned.experts
    if cut is None:
        counts = ",".join(map(str, planned.experts or [])) or "..."
        raise LaunchError(
            f"{model} has no expert node folders for {len(nodes)} nodes: cut them with "
            f"mlxdist quantize {model} {model}-{len(nodes)}x --parallel expert --experts "
            f"{counts}, then launch that folder"
        )
    if not planned.fits:
        raise LaunchError(f"the model {planned.message}")
    return cut


def choose_tensor(
    model: Path,
    nodes: list[Node],
    context: int,
    kv_bits: int | None = None,
    speculative: str = "none",
) -> list[int]:
    """Checks a tensor-parallel launch: heads that divide by the nodes, and each node's cut of
    the weights (1/N of the model) and of the KV cache within its memory (node 0's with the
    MTP layer when speculative is "mtp"). Returns the split (every node runs every layer)."""
    try:
        check_tensor_split(read_config(model), len(nodes))
    except CheckpointError as e:
        raise LaunchError(str(e)) from None
    spec = model_spec_from_folder(model, kv_bits=kv_bits, speculative=speculative)
    held = tensor_held_bytes(spec, context, len(nodes))
    for rank, (node, need) in enumerate(zip(_specs(nodes), held)):
        if need > node.usable_bytes():  # the planner's headroom, as for the other modes
            drafts = rank == 0 and spec.mtp_bytes > 0  # node 0 also holds the MTP layer
            where, mtp = (node.name, ", and the MTP layer") if drafts else ("each node", "")
            raise LaunchError(
                f"tensor parallelism needs {need / 1e9:.1f} GB on {where} (1/{len(nodes)} of "
                f"the weights and KV cache{mtp}) but {node.name} has "
                f"{node.usable_bytes() / 1e9:.1f} GB to spare: add nodes, or use --parallel "
                f"pipeline or expert, which the planner fits to each node"
            )
    return [spec.num_layers] * len(nodes)


def start_agents_cluster(
    model: Path,
    hosts: Path | None,
    cluster: str | None,
    interfaces: list[str],
    secret: bytes,
    context: int,
    port: int | None,
    parallel: str = "pipeline",
    backend: str | None = None,
    fetch: str = "auto",
    ref=None,
    api: dict | None = None,
    kv_bits: int | None = None,
    prompt_cache_bytes: int | None = None,
    speculative: str = "none",
    draft_tokens: int = DRAFT_TOKENS,
):
    """Finds the nodes, checks the plan, gets each node its files, starts the ranks.

    backend: ring, jaccl or auto (default: the hosts file's, else auto).
    fetch: hub, push or auto (launcher/fetch.py); ref: the quantize.source.ModelRef the user
    named, whose repo the nodes may fetch from (model then holds at least its config and index).
    api: rank 0's API settings and key (launcher/local.py start_local's api).
    kv_bits: every rank's KV cache quantised to 4 or 8 bits (planned at that size);
    prompt_cache_bytes: rank 0's budget of kept prefixes (None: what the plan leaves).
    speculative, draft_tokens: rank 0's speculative decoding ("none", "ngram" or "mtp": then the
    plan counts the MTP layer on the rank that drafts) and drafts per step.
    """
    from rich.console import Console

    check_parallel(parallel)  # before any agent is asked
    check_fetch(fetch)
    console = Console(stderr=True, soft_wrap=True)
    if hosts is not None:
        nodes = nodes_from_hosts(hosts, secret)
    else:
        nodes = discover_nodes(cluster, interfaces, secret)
        if not nodes:
            raise LaunchError(
                f"no agent of cluster {cluster!r} answered: run mlxdist agent --cluster "
                f"{cluster} on each Mac, on the interface given here"
            )
    nodes = ring(nodes, keep_order=hosts is not None)
    asked = backend or (read_hosts(hosts).backend if hosts is not None else "auto")
    decision = decide(model, nodes, asked, parallel, context, console)
    chosen, parallel = decision.backend, decision.parallel
    # jaccl sends over the RDMA devices; only the ring needs the cables' own addresses.
    ring_ips = cable_addresses(nodes, console) if decision.over_cables else None
    how = {"chosen": chosen, "fetch": fetch, "ref": ref, "api": api}
    how |= {"kv_bits": kv_bits, "prompt_cache_bytes": prompt_cache_bytes}
    how |= {"speculative": speculative, "draft_tokens": draft_tokens}
    how |= {"link": decision.link, "auto": decision.auto}
    whole = ref is not None and ref.repo is not None
    if parallel == "tensor":
        split = choose_tensor(model, nodes, context, kv_bits, speculative)
        return _start(model, nodes, split, ring_ips, context, port, console, tensor=True, **how)
    if parallel == "expert":
        experts = choose_experts(model, nodes, context, whole, kv_bits, speculative)
        split = [model_spec_from_folder(model).num_layers] * len(nodes)
        return _start(model, nodes, split, ring_ips, context, port, console, experts, **how)
    split = choose_split(model, nodes, context, whole, kv_bits, speculative)
    return _start(model, nodes, split, ring_ips, context, port, console, **how)


def replan_agents(model: Path, context: int, port: int | None, failed):
    """After a failure: the plan made again on the nodes that remain, and the ranks started there.

    failed: the RemoteCluster that failed (its failure() has named the failed nodes)."""
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)
    lost = set(failed.failed_nodes)
    nodes = [n for n in failed.nodes if n.name not in lost]
    if not lost or not nodes:
        raise LaunchError("no node remains to plan on: launch again when the nodes are back")
    nodes = _with_facts(nodes)
    names = ", ".join(n.name for n in nodes)
    specs = _specs(nodes)
    spec = model_spec_from_folder(model, kv_bits=failed.kv_bits, speculative=failed.speculative)
    planned = plan(specs, spec, context=context)
    if not planned.fits:
        raise LaunchError(
            f"the model does not fit on the remaining nodes ({names}): {planned.message}"
        )
    split = node_folders(model, len(nodes)) or planned.split
    # The cables' ring is broken where the node went: the ring runs over the hosts' addresses;
    # a mesh without the node is still one, so jaccl stays where it still can.
    chosen = choose_nodes_backend(nodes, "ring" if failed.backend == "ring" else "auto", console)
    how = {"chosen": chosen, "fetch": failed.fetch, "ref": failed.ref, "api": failed.api}
    how |= {"kv_bits": failed.kv_bits, "prompt_cache_bytes": failed.prompt_cache_asked}
    how |= {"speculative": failed.speculative, "draft_tokens": failed.draft_tokens}
    how |= {"link": link_for(chosen.backend, False)}
    return _start(model, nodes, split, None, context, port, console, **how)


def predicted_tps(
    model: Path,
    nodes: list[Node],
    mode: str,
    split: list[int],
    link: str | None,
    context: int,
    auto: Choice | None = None,
) -> float | None:
    """The performance model's decode speed for this launch: --parallel auto's own figure for
    the mode it chose, else predicted for these nodes, mode and split; None when the model
    cannot say (an unknown family, no link, a chip it has no figures for: it would be taken for
    an Apple chip of its memory, a figure with no meaning beside a measured one)."""
    from launcher.chips import chip_of_node_name

    if any(chip_of_node_name(n.facts.get("chip") or "") is None for n in nodes):
        return None
    if auto is not None:
        return next((o.tokens_per_s for o in auto.outcomes if o.mode == mode), None)
    if link is None:
        return None
    from launcher.autoparallel import model_inputs
    from launcher.perfmodel import predict_decode

    try:
        _, active, _ = model_inputs(model, len(nodes))
        cut = split if mode == "pipeline" else None
        return predict_decode(_specs(nodes), active, cut, mode, link, context).tokens_per_s
    except (CheckpointError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def _progress(console):
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    columns += (TransferSpeedColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console, transient=True)


def _from_hub(model: Path, ref, nodes: list[Node], split: list[int], mode: str, console):
    """Every node's agent fetches its own files from the Hub; returns their folders."""
    commit = pin_commit(ref.repo, ref.revision)  # once: the listing and every node at one commit
    rows = hub_shares(model, repo_sizes(ref.repo, commit), mode, split)
    note = every_file_note(mode)
    if note:
        console.print(note, highlight=False)
    with _progress(console) as bar:
        tasks = {n.name: bar.add_task(f"hub {n.name}", total=r.bytes) for n, r in zip(nodes, rows)}
        tasks["total"] = bar.add_task("hub total", total=sum(r.bytes for r in rows))

        def show(lines) -> None:
            for name, done, total, _, _ in lines:
                bar.update(tasks[name], completed=done, total=total)

        infos = hub_fetch(nodes, ref.repo, commit, [r.files for r in rows], show, verify=ref.verify)
    for node, row, info in zip(nodes, rows, infos):
        console.print(
            f"{node.name}: {info['received']} bytes received of its share of {row.bytes} bytes",
            highlight=False,
        )
    return [info["folder"] for info in infos]


def _push(model: Path, nodes: list[Node], split: list[int], mode: str, console) -> list[str]:
    """The launcher sends each node only its files (its node folder when the model was cut for
    this split, else the files holding its part), after checking each node's free disk."""
    from launcher.remote import push_for_split, push_shards, push_whole

    n = len(nodes)
    cut = node_folders(model, n) == split if mode == "pipeline" else expert_folders(model, n)
    every = mode == "tensor" or (mode == "expert" and not cut)
    if every:
        console.print(every_file_note(mode), highlight=False)
    _check_push_disk(model, nodes, split, "tensor" if every else mode, bool(cut))
    with _progress(console) as bar:
        tasks: dict[str, int] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(f"push {name}", total=total)
            bar.update(tasks[name], completed=done)

        if every:
            return push_whole(model, nodes, progress)
        if cut:
            return push_shards(model, nodes, progress)
        # a plan made again after a failure, or a whole model: no node folders were cut for it
        return push_for_split(model, nodes, split, progress)


def _check_push_disk(model: Path, nodes: list[Node], split: list[int], mode: str, cut: bool):
    """Refuses a push whose files (less those a node already holds) do not fit a node's disk."""
    from launcher.nodefiles import Share, check_disk, node_files
    from launcher.remote import whole_files
    from quantize.checkpoint import weight_map

    rows = []
    tied = bool(read_config(model).get("tie_word_embeddings", False))
    for rank, node in enumerate(nodes):
        if isinstance(node.client, SshClient):
            files, rel = [], ""  # mlx.launch's way: the model is already on that host
        elif mode == "tensor":
            files, rel = whole_files(model), f"{model.name}/whole"
        elif cut:
            folder = model / "nodes" / str(rank)
            files, rel = (
                sorted(p for p in folder.iterdir() if p.is_file()),
                f"{model.name}/nodes/{rank}",
            )
        else:
            names = node_files(
                weight_map(model),
                [p.name for p in whole_files(model)],
                "pipeline",
                split,
                rank,
                tied,
            )
            files = [model / n for n in names]
            rel = f"{model.name}/split-{'-'.join(map(str, split))}/{rank}"
        rows.append(Share(rank, [], missing_bytes(node, files, rel) if files else 0))
    check_disk(_specs(nodes), rows, "push")


def _start(
    model: Path,
    nodes: list[Node],
    split: list[int],
    ring_ips,
    context,
    port,
    console,
    experts: list[int] | None = None,
    tensor: bool = False,
    chosen: BackendChoice | None = None,
    fetch: str = "push",
    ref=None,
    api: dict | None = None,
    kv_bits: int | None = None,
    prompt_cache_bytes: int | None = None,
    speculative: str = "none",
    draft_tokens: int = DRAFT_TOKENS,
    link: str | None = None,
    auto: Choice | None = None,
):
    """Gets each node its files (from the Hub or pushed), starts the ranks, waits until they
    have loaded.

    experts: routed experts per node (expert parallelism; every node runs every layer).
    tensor: every node runs 1/N of every layer, from the whole model.
    kv_bits, prompt_cache_bytes, speculative, draft_tokens: as start_agents_cluster takes them.
    link, auto: what the prediction sends over, and --parallel auto's choice (for the view of
    the cluster rank 0's dashboard shows)."""
    from launcher.local import wait_ready
    from launcher.promptbudget import describe, planned_budget
    from launcher.remote import HTTP_PORT, start_remote

    shares = [f"experts {e}" for e in experts] if experts else [f"layers {k}" for k in split]
    if tensor:
        shares = [f"1/{len(nodes)} of every layer"] * len(nodes)
    mode = "tensor" if tensor else "expert" if experts else "pipeline"
    budget = prompt_cache_bytes
    if budget is None:  # what the plan of these ranks leaves
        specs = _specs(nodes)
        budget = planned_budget(model, specs, split, mode, experts, context, kv_bits, speculative)
    kv = describe(budget, kv_bits)
    console.print(
        f"{len(nodes)} nodes: "
        + ", ".join(f"{n.name} ({n.address}) {s}" for n, s in zip(nodes, shares))
        + (f"; ring over the cables {ring_ips}" if ring_ips else "")
        + (f"; {kv}" if kv else "")
    )
    repo = ref.repo if ref is not None else None
    how, why = choose_fetch(fetch, nodes, repo, ref.revision if repo else None)
    console.print(f"files: {how} ({why})", highlight=False)
    if how == "hub":
        folders = _from_hub(model, ref, nodes, split, mode, console)
    else:
        if repo:  # the launcher fetches the whole model once, then pushes each node its part
            model = whole_model(ref)
        folders = _push(model, nodes, split, mode, console)
    backend = chosen.backend if chosen else "ring"
    predicted = predicted_tps(model, nodes, mode, split, link, context, auto)
    rows = [(n.name, n.address, n.facts) for n in nodes]
    view = launch_view(rows, mode, split, backend, predicted, link)
    running = start_remote(
        nodes,
        folders,
        split,
        name=model.name,
        http_port=port or HTTP_PORT,
        ring_ips=ring_ips,
        max_context=context,  # the plan holds this much KV cache: longer requests are refused
        experts=experts,
        parallel="tensor" if tensor else "pipeline",
        backend=backend,
        rdma=chosen.rdma if chosen else None,
        api=api,
        kv_bits=kv_bits,
        prompt_cache_bytes=budget,
        speculative=speculative,
        draft_tokens=draft_tokens,
        view=view_text(view),
    )
    running.fetch, running.ref, running.api = how, ref, api
    running.kv_bits, running.prompt_cache_asked = kv_bits, prompt_cache_bytes
    running.speculative, running.draft_tokens = speculative, draft_tokens
    try:
        with console.status(f"loading {model.name} on {len(nodes)} nodes..."):
            wait_ready(running)
    except BaseException:
        running.stop()
        raise
    return running
