"""Start one rank per host through the hosts' agents: shards pushed, hostfile written, ranks
watched and stopped."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx

from quantize.checkpoint import read_config, weight_map
from quantize.nodes import node_manifest

from .agent_client import AgentClient, AgentError
from .backend import RDMA_BACKENDS
from .hostfile import mlx_launch_hostfile, ring_entries
from .local import LaunchError, describe_failure, verdict
from .nodefiles import node_files
from .rankenv import JACCL_PORT, backend_envs
from .rankspec import DRAFT_TOKENS, MAX_BODY_MB, NODE_FAILED, PEER_GONE
from .ssh import SshClient

RING_PORT = 32323  # mlx.launch's first ring port
HTTP_PORT = 52480  # the coordinator's API on rank 0's host; its heartbeats on the next port
RETRIES = 3  # a cut-off or silent agent is asked again this many times, after 0.5, 1 and 2 s
BACKOFF = 0.5
POLL_TIMEOUT = 3.0  # seconds failure() waits for an agent: a powered-off Mac is named in seconds
T = TypeVar("T")
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # what an agent takes as a name


@dataclass
class Node:
    name: str
    address: str  # where the other ranks and the launcher reach this host
    client: AgentClient
    facts: dict = field(default_factory=dict)
    ssh: str | None = None  # hosts.toml's ssh destination ("me@studio-1.local"), if given

    @property
    def destination(self) -> str:
        """Where mlx.launch would ssh to: the destination the user gave, else the address."""
        return self.ssh or self.address


@dataclass
class RemoteCluster:
    nodes: list[Node]  # in rank order
    run_ids: list[str]
    url: str
    hostfile: str
    failed_nodes: list[str] = field(default_factory=list)  # named by failure()
    backend: str = "ring"
    fetch: str = "push"  # how the nodes got their files, for a plan made again after a failure
    ref: object = None  # the quantize.source.ModelRef launched, when a repo
    api: dict | None = None  # rank 0's API settings and key, for a plan made again
    kv_bits: int | None = None  # every rank's quantised KV cache, for a plan made again
    prompt_cache_asked: int | None = None  # --prompt-cache-bytes (None: each plan's own)
    speculative: str = "none"  # rank 0's speculative decoding, for a plan made again
    draft_tokens: int = DRAFT_TOKENS

    def failure(self) -> str | None:
        """Names the node that failed first: its peers then fail too, only because it went away."""
        exited, said = [], None
        for rank, (node, run_id) in enumerate(zip(self.nodes, self.run_ids)):
            try:
                runs = {r["id"]: r for r in self._ranks(node, patient=not exited)}
            except AgentError as e:
                if e.status in (None, 503) and not exited and self.serving():
                    continue  # the heartbeat hears every rank: the agent is only busy or cut off
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

    def _ranks(self, node: Node, patient: bool) -> list[dict]:
        """node's runs; a busy or silent agent is asked again, unless the heartbeat has
        answered already: rank 0 serves (every rank beats), or a rank has exited (the cluster
        is down), or nothing listens on the agent's port (it is gone, not busy)."""
        try:
            return _poll(node.client)
        except AgentError as e:
            if not patient or _refused(e) or e.status not in (None, 503) or self.serving():
                raise
        return retrying(partial(_poll, node.client))

    def serving(self) -> bool:
        """Whether rank 0 answers /health: it does only while its heartbeat hears every rank."""
        try:
            return httpx.get(self.url + "/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        for node in self.nodes:
            try:
                # Sent again after a reset (stopping twice is harmless), not after a timeout:
                # a powered-off host is not waited for four times.
                retrying(node.client.stop_all, after_timeout=False)
            except AgentError:
                pass  # an agent that is gone has taken its ranks with it


def _poll(client: AgentClient | SshClient) -> list[dict]:
    """client's runs, waiting POLL_TIMEOUT at most for an agent (an ssh client's are local)."""
    if isinstance(client, AgentClient):
        return client.ranks(timeout=POLL_TIMEOUT)
    return client.ranks()


def retrying(call: Callable[[], T], after_timeout: bool = True) -> T:
    """call(), again after a pause while the agent is busy (503) or cut off before it answered
    (a reset: the agent's guard aborts connections to make room) or, with after_timeout, silent
    past the timeout: a node is not called failed on one unanswered request. For requests safe
    to send twice. Nothing listening on the port is final: the agent is gone, not busy."""
    pause = BACKOFF
    for attempt in range(RETRIES + 1):
        try:
            return call()
        except AgentError as e:
            if not _again(e, after_timeout) or attempt == RETRIES:
                raise
        time.sleep(pause)
        pause *= 2
    raise AssertionError("unreachable")


def _again(e: AgentError, after_timeout: bool) -> bool:
    """Whether a request that failed with e may be sent again."""
    if e.status == 503:
        return True
    return e.status is None and not _refused(e) and (after_timeout or not _timed_out(e))


def start_once(client: AgentClient, fields: dict) -> dict:
    """Starts a rank; after a reset or timeout with no answer it is sent again only when the
    agent's runs show it did not start (a new run of that rank means it did: that one is it)."""
    before = {r["id"] for r in retrying(client.ranks)}
    pause = BACKOFF
    for attempt in range(RETRIES + 1):
        try:
            return client.start_rank(**fields)
        except AgentError as e:
            if not _again(e, True) or attempt == RETRIES:
                raise
        time.sleep(pause)
        pause *= 2
        for run in retrying(client.ranks):
            if run["id"] not in before and run.get("rank") == fields["rank"]:
                return run
    raise AssertionError("unreachable")


def _timed_out(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, httpx.TimeoutException):
            return True
        e = e.__context__
    return False


def _refused(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, ConnectionRefusedError):
            return True
        e = e.__context__
    return False


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
    files = whole_files(model)
    remote = []
    for node in nodes:
        if isinstance(node.client, SshClient):
            remote.append(str(model.resolve()))  # as mlx.launch: the same path on that host
            continue
        rel = f"{model.name}/whole"
        _push(node, files, rel, progress)
        remote.append(rel)
    return remote


def whole_files(model: Path) -> list[Path]:
    """A model folder's own files; node folders and the manifest that lists them stay behind."""
    return sorted(p for p in model.iterdir() if p.is_file() and p.name != "manifest.json")


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
    """For a split the model has no node folders for (a plan made again after a failure, or a
    whole model): each host gets the model's small files and the weight files that hold its
    layers (launcher/nodefiles.py)."""
    tied = bool(read_config(model).get("tie_word_embeddings", False))
    files = [
        node_files(weight_map(model), _top_files(model), "pipeline", split, rank, tied)
        for rank in range(len(nodes))
    ]
    tag = f"split-{'-'.join(map(str, split))}"
    return push_files(model, nodes, files, [f"{model.name}/{tag}/{r}" for r in range(len(nodes))])


def _top_files(model: Path) -> list[str]:
    return sorted(p.name for p in model.iterdir() if p.is_file())


def push_files(
    model: Path,
    nodes: list[Node],
    files: list[list[str]],
    rels: list[str],
    progress: Callable[[str, int, int], None] | None = None,
) -> list[str]:
    """Sends node r files[r] of the model into rels[r] under its models folder, each file
    once (a file its agent already holds whole is not sent again); returns rels."""
    for node, mine, rel in zip(nodes, files, rels):
        _push(node, [model / name for name in mine], rel, progress)
    return list(rels)


def rank_links(
    hosts: list[tuple[str, str]],
    backend: str = "ring",
    ring_ips: list[list[str]] | None = None,
    rdma: list[list[str | list[str] | None]] | None = None,
    ring_port: int = RING_PORT,
) -> tuple[str, dict]:
    """How the ranks of hosts [(ssh destination, address)] reach each other: the hostfile
    mlx.launch would read for them, and the start_rank values every rank gets (backend, and the
    ring's hostfile or the RDMA devices and coordinator of jaccl and jaccl-ring).

    ring_ips[r]: rank r's addresses on the cable(s) from rank r-1; else each host's address.
    rdma (jaccl, jaccl-ring): rdma[i][j] is rank i's device to rank j; rank 0's address is the
    coordinator's.
    """
    backend = backend if len(hosts) > 1 else "ring"  # one rank talks to no one
    jaccl = backend in RDMA_BACKENDS
    if jaccl and rdma is None:
        raise ValueError(f"{backend} needs the RDMA device matrix")
    ips = [[address] for _, address in hosts] if jaccl or not ring_ips else ring_ips
    envs = [f"{k}={v}" for k, v in backend_envs(backend).items()]
    rows = [(destination, rank_ips) for (destination, _), rank_ips in zip(hosts, ips)]
    text = mlx_launch_hostfile(rows, backend, rdma if jaccl else None, envs)
    if jaccl:
        coordinator = f"{hosts[0][1]}:{JACCL_PORT}"
        return text, {"backend": backend, "hostfile": [], "rdma": rdma, "coordinator": coordinator}
    ring = ring_entries(ips, ring_port) if len(hosts) > 1 else []
    return text, {"backend": backend, "hostfile": ring}


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
    backend: str = "ring",
    rdma: list[list[str | list[str] | None]] | None = None,
    api: dict | None = None,
    kv_bits: int | None = None,
    prompt_cache_bytes: int | None = None,
    speculative: str = "none",
    draft_tokens: int = DRAFT_TOKENS,
    view: str | None = None,
) -> RemoteCluster:
    """Starts rank r on nodes[r] from its folder; rank 0 serves the API on its host.

    ring_ips, backend, rdma: as rank_links takes them.
    experts: routed experts per rank for expert parallelism (split then only counts the ranks,
    as in tensor parallelism).
    api: rank 0's API settings and key (launcher/local.py start_local's api), sent to rank 0 only.
    kv_bits: every rank's KV cache quantised to 4 or 8 bits; prompt_cache_bytes: rank 0's
    budget of kept prefixes (0: off; None: the rank's own default), sent to rank 0 only.
    speculative, draft_tokens: speculative decoding ("none", "ngram" or "mtp") and drafts per
    step, sent to rank 0 only (prompt lookup drafts there; the others verify as they would
    decode), or with "mtp" to every rank (the one holding the head drafts with the MTP layer).
    view: the cluster as the launcher sees it (launcher/clusterview.py), sent to rank 0 only.
    """
    mtp = speculative == "mtp"
    text, links = rank_links(
        [(n.destination, n.address) for n in nodes], backend, ring_ips, rdma, ring_port
    )
    backend = links["backend"]
    if run_dir is not None:
        (run_dir / "hostfile.json").write_text(text)  # reusable with mlx.launch
    run_ids: list[str] = []
    url = f"http://{nodes[0].address}:{http_port}"
    cluster = RemoteCluster(nodes, run_ids, url, text, backend=backend)
    # Every rank beats, those over ssh too (their token goes on the ssh client's stdin).
    beats = len(nodes) > 1
    token = secrets.token_hex(16)
    try:
        for rank, (node, folder) in enumerate(zip(nodes, folders)):
            fields = dict(
                model=folder,
                split=split,
                rank=rank,
                http_host=nodes[0].address,
                http_port=http_port,
                name=name,
                **links,
                **({"max_context": max_context} if max_context else {}),
                **({"heartbeat_port": http_port + 1, "heartbeat_token": token} if beats else {}),
                **({"node": node.name} if _NODE_NAME.fullmatch(node.name) else {}),
                **({"parallel": "expert", "experts": experts} if experts else {}),
                **({"parallel": parallel} if parallel == "tensor" else {}),
                **(_api_fields(api) if rank == 0 else {}),
                **({"kv_bits": kv_bits} if kv_bits else {}),
                **(_budget(prompt_cache_bytes) if rank == 0 else {}),
                **(_drafts(speculative, draft_tokens) if rank == 0 or mtp else {}),
                **({"view": view} if view and rank == 0 else {}),
            )
            started = start_once(node.client, fields)
            run_ids.append(started["id"])
    except AgentError as e:
        cluster.stop()
        raise LaunchError(f"could not start a rank on {node.name}: {e}") from None
    return cluster


def _budget(prompt_cache_bytes: int | None) -> dict:
    """StartRank's prompt_cache_bytes, only when set (an older agent sees none)."""
    return {} if prompt_cache_bytes is None else {"prompt_cache_bytes": prompt_cache_bytes}


def _drafts(speculative: str, draft_tokens: int) -> dict:  # every rank's with "mtp"
    """StartRank's speculative and draft_tokens, only when speculating (an older agent sees
    none)."""
    if speculative == "none":
        return {}
    return {"speculative": speculative, "draft_tokens": draft_tokens}


def _api_fields(api: dict | None) -> dict:
    """StartRank's fields for rank 0's API: only those set, so an older agent sees none."""
    if not api:
        return {}
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in api.items()}
    if fields.get("max_body_mb") == MAX_BODY_MB:
        del fields["max_body_mb"]
    return {k: v for k, v in fields.items() if v not in (None, False, [])}
