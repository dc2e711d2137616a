"""Start one rank per host through the hosts' agents: shards pushed, hostfile written, ranks
watched and stopped."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from quantize.checkpoint import layer_of, weight_map
from quantize.nodes import node_manifest

from .agent_client import AgentClient, AgentError
from .hostfile import mlx_launch_hostfile, ring_hostfile
from .local import LaunchError, describe_failure, verdict
from .rankspec import NODE_FAILED, PEER_GONE
from .ssh import SshClient

RING_PORT = 32323  # mlx.launch's first ring port
HTTP_PORT = 52480  # the coordinator's API on rank 0's host; its heartbeats on the next port
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # what an agent takes as a name


@dataclass
class Node:
    name: str
    address: str  # where the other ranks and the launcher reach this host
    client: AgentClient
    facts: dict = field(default_factory=dict)


@dataclass
class RemoteCluster:
    nodes: list[Node]  # in rank order
    run_ids: list[str]
    url: str
    hostfile: str
    failed_nodes: list[str] = field(default_factory=list)  # named by failure()

    def failure(self) -> str | None:
        """Names the node that failed first: its peers then fail too, only because it went away."""
        exited, said = [], None
        for rank, (node, run_id) in enumerate(zip(self.nodes, self.run_ids)):
            try:
                runs = {r["id"]: r for r in node.client.ranks()}
            except AgentError as e:
                self.failed_nodes = [node.name]
                return f"rank {rank} on node {node.name}: its agent stopped answering ({e})"
            run = runs.get(run_id)
            if run is None or not run["alive"]:
                code = run["returncode"] if run else -9
                if rank == 0 and code == NODE_FAILED:
                    said = verdict(_log(node, run_id, 200))
                tail = _last_line(node, run_id)
                exited.append((f"rank {rank} on node {node.name}", code, tail))
        if not exited:
            return None
        named = re.match(r"rank (\d+) ", said or "")
        culprits = [int(named.group(1))] if named else []
        culprits += [int(w.split()[1]) for w, c, _ in exited if c not in (NODE_FAILED, PEER_GONE)]
        self.failed_nodes = [self.nodes[r].name for r in culprits if r < len(self.nodes)]
        return describe_failure(said, exited)

    def stop(self) -> None:
        for node in self.nodes:
            try:
                node.client.stop_all()
            except AgentError:
                pass  # an agent that is gone has taken its ranks with it


def _log(node: Node, run_id: str, lines: int) -> str:
    try:
        return node.client.log(run_id, lines)
    except AgentError:
        return ""


def _last_line(node: Node, run_id: str) -> str:
    lines = [x for x in _log(node, run_id, 20).splitlines() if x.strip()]
    return (lines or ["no output"])[-1]


def node_folders(model: Path, size: int) -> list[int] | None:
    """The split model/nodes/ was cut for, when it has one pipeline folder per rank."""
    first = node_manifest(model / "nodes" / "0")
    if first is None or first.get("parallel", "pipeline") != "pipeline":
        return None
    if len(first["plan"]["split"]) != size:
        return None
    return first["plan"]["split"]


def expert_folders(model: Path, size: int) -> list[int] | None:
    """The routed experts per rank model/nodes/ was cut for in expert mode, for size ranks."""
    first = node_manifest(model / "nodes" / "0")
    if first is None or first.get("parallel") != "expert":
        return None
    counts = first["plan"].get("experts") or []
    return counts if len(counts) == size else None


def push_shards(
    model: Path, nodes: list[Node], progress: Callable[[str, int, int], None] | None = None
) -> list[str]:
    """Copies nodes/<r> to host r, one copy over the wire; returns each folder's remote path."""
    remote = []
    for rank, node in enumerate(nodes):
        folder = model / "nodes" / str(rank)
        if isinstance(node.client, SshClient):
            remote.append(str(folder.resolve()))  # as mlx.launch: the same path on that host
            continue
        rel = f"{model.name}/nodes/{rank}"
        _push(node, sorted(p for p in folder.iterdir() if p.is_file()), rel, progress)
        remote.append(rel)
    return remote


def push_whole(
    model: Path, nodes: list[Node], progress: Callable[[str, int, int], None] | None = None
) -> list[str]:
    """The whole model to every host (tensor parallelism: each rank reads its cut of every
    tensor); node folders and the manifest that lists them stay behind."""
    files = sorted(p for p in model.iterdir() if p.is_file() and p.name != "manifest.json")
    remote = []
    for node in nodes:
        if isinstance(node.client, SshClient):
            remote.append(str(model.resolve()))  # as mlx.launch: the same path on that host
            continue
        rel = f"{model.name}/whole"
        _push(node, files, rel, progress)
        remote.append(rel)
    return remote


def _push(node: Node, files: list[Path], rel: str, progress) -> None:
    """Sends files into rel/ under the node agent's models folder, each with its progress."""
    for f in files:

        def tick(done: int, total: int, name=f"{node.name}: {f.name}") -> None:
            if progress:
                progress(name, done, total)

        node.client.push_file(f, f"{rel}/{f.name}", progress=tick)


def push_for_split(
    model: Path,
    nodes: list[Node],
    split: list[int],
    progress: Callable[[str, int, int], None] | None = None,
) -> list[str]:
    """For a split the model has no node folders for (a plan made again after a failure): each
    host gets the model's small files and the weight files that hold its layers."""
    weights = weight_map(model)
    small = [p for p in model.iterdir() if p.is_file() and p.suffix != ".safetensors"]
    small = [p for p in small if p.name != "manifest.json"]  # it lists files not sent
    remote, start = [], 0
    for rank, (node, layers) in enumerate(zip(nodes, split)):
        end = start + layers
        mine = {f for k, f in weights.items() if (i := layer_of(k)) is None or start <= i < end}
        start = end
        rel = f"{model.name}/split-{'-'.join(map(str, split))}/{rank}"
        _push(node, sorted(small) + [model / name for name in sorted(mine)], rel, progress)
        remote.append(rel)
    return remote


def start_remote(
    nodes: list[Node],
    folders: list[str],
    split: list[int],
    *,
    name: str,
    ring_port: int = RING_PORT,
    http_port: int = HTTP_PORT,
    run_dir: Path | None = None,
    ring_ips: list[list[str]] | None = None,
    max_context: int | None = None,
    experts: list[int] | None = None,
    parallel: str = "pipeline",
) -> RemoteCluster:
    """Starts rank r on nodes[r] from its folder; rank 0 serves the API on its host.

    ring_ips[r]: rank r's addresses on the cable(s) from rank r-1; else each node's address.
    experts: routed experts per rank for expert parallelism (split then only counts the ranks,
    as in tensor parallelism).
    """
    ips = ring_ips or [[n.address] for n in nodes]
    # Hosts sharing an address (all on one machine, as in a loopback test) need their own ports.
    shared = len({n.address for n in nodes}) < len(nodes)
    hostfile = [
        [f"{ip}:{ring_port + (r if shared else 0)}" for ip in rank_ips]
        for r, rank_ips in enumerate(ips)
    ]
    ring_hostfile(hostfile)  # validates
    text = mlx_launch_hostfile([(n.name, rank_ips) for n, rank_ips in zip(nodes, ips)])
    if run_dir is not None:
        (run_dir / "hostfile.json").write_text(text)  # reusable with mlx.launch
    run_ids: list[str] = []
    cluster = RemoteCluster(nodes, run_ids, f"http://{nodes[0].address}:{http_port}", text)
    # Heartbeats need every rank to take part; a host reached over ssh starts its rank without.
    beats = len(nodes) > 1 and not any(isinstance(n.client, SshClient) for n in nodes)
    token = secrets.token_hex(16)
    try:
        for rank, (node, folder) in enumerate(zip(nodes, folders)):
            started = node.client.start_rank(
                model=folder,
                split=split,
                rank=rank,
                hostfile=hostfile if len(nodes) > 1 else [],
                http_host=nodes[0].address,
                http_port=http_port,
                name=name,
                backend="ring",
                **({"max_context": max_context} if max_context else {}),
                **({"heartbeat_port": http_port + 1, "heartbeat_token": token} if beats else {}),
                **({"node": node.name} if _NODE_NAME.fullmatch(node.name) else {}),
                **({"parallel": "expert", "experts": experts} if experts else {}),
                **({"parallel": parallel} if parallel == "tensor" else {}),
            )
            run_ids.append(started["id"])
    except AgentError as e:
        cluster.stop()
        raise LaunchError(f"could not start a rank on {node.name}: {e}") from None
    return cluster
