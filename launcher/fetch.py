"""How each node gets its files (`--fetch hub|push|auto`): its agent downloads them from the
Hub itself, or the launcher pushes them over the cables; progress per node and in total, with
rate and time left.

hub: every agent fetches only its files into its own Hugging Face cache (resumed, checked
against the Hub's sizes and hashes), all at the one commit the launcher resolved the revision
to; HF_TOKEN, when set, goes only in the signed request body and never into a message.
push: the launcher, which holds the model, sends each node only its files, each once.
auto: hub when every agent reaches the Hub (one small request each), else push.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from quantize.checkpoint import human_bytes, read_config, weight_map
from quantize.errors import UserError

from .agent_client import AgentClient, AgentError
from .nodefiles import Share, shares
from .remote import Node

FETCH_MODES = ("auto", "hub", "push")
COMMIT = re.compile(r"[0-9a-f]{40}")
INDEX = "model.safetensors.index.json"


class FetchError(UserError):
    """A node that could not get its files; the message names it and the file."""


def check_fetch(mode: str) -> str:
    if mode not in FETCH_MODES:
        raise FetchError(f"--fetch {mode!r} is not one of {', '.join(FETCH_MODES)}")
    return mode


def hf_token() -> str | None:
    """The launcher's Hugging Face token (HF_TOKEN, else the one `hf auth login` saved),
    forwarded to the agents only when there is one."""
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token() or None


def scrub(text: str, token: str | None = None) -> str:
    """text without the token (the launcher's own when none is given), should an agent or a
    server have echoed it into an error."""
    token = token if token is not None else hf_token()
    return text.replace(token, "<token>") if token else text


def pin_commit(repo: str, revision: str | None) -> str:
    """The commit revision names now, asked once, so that every node fetches that very commit
    even if the branch moves while they fetch."""
    if revision and COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi

    label = f"{repo}@{revision}" if revision else repo
    try:
        sha = HfApi(token=hf_token()).model_info(repo, revision=revision).sha or ""
    except Exception as e:  # unreachable, refused, gated: one line
        why = scrub(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        raise FetchError(f"cannot resolve {label} to a commit on the Hub ({why})") from None
    if not COMMIT.fullmatch(sha):
        raise FetchError(
            f"the Hub gave {label} a commit that is not 40 hex digits: refused (is HF_ENDPOINT "
            "the Hub?)"
        )
    return sha


def choose_fetch(
    asked: str, nodes: list[Node], repo: str | None, revision: str | None = None
) -> tuple[str, str]:
    """The way the files go, and why, in one line's words. Only a repo id can come from the
    Hub; auto asks every agent whether it reaches the Hub."""
    check_fetch(asked)
    if repo is None:
        if asked == "hub":
            raise FetchError(
                "--fetch hub needs a Hugging Face repo id (org/name), not a local folder"
            )
        return "push", "the model is a local folder"
    no_agent = [n.name for n in nodes if not isinstance(n.client, AgentClient)]
    if no_agent and asked != "push":
        if asked == "hub":
            raise FetchError(
                f"--fetch hub needs an agent on every node; {', '.join(no_agent)} has none (ssh)"
            )
        return "push", f"{', '.join(no_agent)} has no agent to fetch with"
    if asked != "auto":
        return asked, f"--fetch {asked}"
    for node in nodes:
        try:
            answer = node.client.probe_hub(repo, revision, hf_token())
        except AgentError as e:
            answer = {"ok": False, "why": str(e)}
        if not answer.get("ok"):
            return "push", scrub(f"{node.name} cannot reach the Hub ({answer.get('why', '')})")
    return "hub", f"every node reaches the Hub and sees {repo}"


@dataclass
class Meter:
    """Rate and time left from (time, bytes done) samples, over a sliding window."""

    window: float = 10.0
    samples: list[tuple[float, int]] = field(default_factory=list)

    def add(self, t: float, done: int) -> None:
        self.samples.append((t, done))
        while len(self.samples) > 2 and t - self.samples[0][0] > self.window:
            self.samples.pop(0)

    def rate(self) -> float:
        """Bytes per second over the window; 0 until two samples differ in time."""
        if len(self.samples) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def left(self, total: int) -> float | None:
        """Seconds left at the current rate; None while it is unknown."""
        rate = self.rate()
        done = self.samples[-1][1] if self.samples else 0
        return (total - done) / rate if rate > 0 else None


def progress_line(name: str, done: int, total: int, rate: float, left: float | None) -> str:
    """One node's line, e.g. studio-1: 1.20 GB of 4.00 GB, 110.00 MB/s, 25 s left."""
    eta = "time left unknown" if left is None else f"{left:.0f} s left"
    if done >= total:
        eta = "done"
    return f"{name}: {human_bytes(done)} of {human_bytes(total)}, {human_bytes(int(rate))}/s, {eta}"


Show = Callable[[list[tuple[str, int, int, float, float | None]]], None]


def hub_fetch(
    nodes: list[Node],
    repo: str,
    revision: str | None,
    files: list[list[str]],
    show: Show | None = None,
    poll: float = 0.5,
    verify: bool = False,
) -> list[dict]:
    """Has every node's agent fetch its files, all at the commit revision names now; returns
    each node's final fetch record (its folder, commit, the bytes it received). show gets, per
    node and then the total, (name, done, total, rate, seconds left) at every poll. verify: the
    agents hash again the files their caches already hold."""
    token = hf_token()
    commit = pin_commit(repo, revision)
    ids = []
    for node, mine in zip(nodes, files):
        try:
            ids.append(node.client.fetch_start(repo, mine, commit, token, verify)["id"])
        except AgentError as e:
            why = scrub(str(e), token)
            raise FetchError(f"{node.name} could not start fetching {repo}: {why}") from None
    meters = [Meter() for _ in nodes] + [Meter()]
    while True:
        infos = []
        for node, fetch_id in zip(nodes, ids):
            try:
                infos.append(node.client.fetch_status(fetch_id))
            except AgentError as e:
                why = scrub(str(e), token)
                raise FetchError(f"{node.name} stopped answering while fetching: {why}") from None
        now = time.monotonic()
        rows = [(n.name, i["done"], i["total"]) for n, i in zip(nodes, infos)]
        rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
        for meter, (_, done, _) in zip(meters, rows):
            meter.add(now, done)
        if show:
            show([(n, d, t, m.rate(), m.left(t)) for (n, d, t), m in zip(rows, meters)])
        failed = [(n, i) for n, i in zip(nodes, infos) if i["state"] == "failed"]
        if failed:
            node, info = failed[0]
            raise FetchError(scrub(f"{node.name}: {info['error']}", token))
        if all(i["state"] == "done" for i in infos):
            return infos
        time.sleep(poll)


def whole_model(ref) -> Path:
    """The launcher's own copy of the whole repo (fetched once into its Hugging Face cache),
    for the push path; ref: quantize.source.ModelRef."""
    from quantize.source import resolve_ref

    spec = f"{ref.repo}@{ref.revision}" if ref.revision else ref.repo
    return resolve_ref(spec).local_path


def repo_sizes(repo: str, revision: str | None) -> dict[str, int]:
    """Each file of a Hugging Face repo (subfolders too, as an index may name files there) with
    its size, from the Hub's listing at the commit revision names now: the listing and the
    index a plan reads then come from one commit when revision is the snapshot's commit."""
    from huggingface_hub import HfApi

    commit = pin_commit(repo, revision)
    try:
        tree = HfApi(token=hf_token()).list_repo_tree(repo, revision=commit, recursive=True)
        return {e.path: e.size for e in tree if getattr(e, "size", None) is not None}
    except Exception as e:  # unreachable, refused, gated: one line
        why = type(e).__name__
        raise FetchError(f"cannot list the files of {repo} on the Hub ({why})") from None


def hub_shares(model: Path, sizes: dict[str, int], mode: str, split: list[int]) -> list[Share]:
    """Each node's files of the repo, from the index in model (config.json and the index). A
    repo without an index (one model.safetensors) gives every node its weight file."""
    from quantize.source import repo_of_snapshot

    found = repo_of_snapshot(model)
    repo = found[0] if found else str(model)
    tied = bool(read_config(model).get("tie_word_embeddings", False))
    if not (model / INDEX).is_file():
        if not any(n.endswith(".safetensors") and "/" not in n for n in sizes):
            raise FetchError(f"{model} has no {INDEX} and the repo no .safetensors file")
        return shares({}, sizes, "tensor", split, tied, repo)  # every node: every weight file
    return shares(weight_map(model), sizes, mode, split, tied, repo)


def one_file_note(ref) -> str | None:
    """The line a launch prints when a repo keeps its weights in one file without an index
    (ref: quantize.source.ModelRef): every node needs all of it, in pipeline mode too."""
    if ref is None or ref.repo is None or (ref.local_path / INDEX).is_file():
        return None
    return (
        f"{ref.repo} keeps its weights in one file without an index ({INDEX}): every node "
        "needs that whole file, in pipeline mode too"
    )


def missing_bytes(node: Node, files: list[Path], rel: str) -> int:
    """What a push would still send to node: files its agent does not already hold whole."""
    need = 0
    for f in files:
        size = f.stat().st_size
        try:
            status = node.client.file_status(f"{rel}/{f.name}")
        except AgentError:
            status = {"complete": False, "size": 0}
        if not (status.get("complete") and status.get("size") == size):
            held = 0 if status.get("complete") else status.get("size", 0)
            need += max(0, size - held)
    return need
