"""A serving cluster on the dashboard: its make-up from the ranks' own figures and the
launcher's view, and the figures each tick reads from rank 0's coordinator."""

from __future__ import annotations

import queue
import time
from collections import Counter
from collections.abc import Callable

STATS_EVERY = 5.0  # seconds between the traffic counters read through the ring, when idle


def node_names(hosts: list[str]) -> list[str]:
    """Each rank's name on the page: its host's, or "host #rank" where ranks share a host (a
    cluster on one machine)."""
    seen = Counter(hosts)
    return [h if seen[h] == 1 else f"{h} #{r}" for r, h in enumerate(hosts)]


_TEXT = ("name", "address", "chip", "state", "parallel", "backend", "link", "generation", "a", "b")
_NUMBER = (
    "rank",
    "memory_total",
    "memory_usable",
    "memory_used",
    "wired_limit",
    "weights",
    "predicted_tps",
)


def _clean(part) -> dict:
    """A dict of the view's with only fields of the expected types (short texts, numbers, the
    split, rdma): what the page draws is never a shape it does not expect."""
    if not isinstance(part, dict):
        return {}
    out = {}
    for k, v in part.items():
        if k in _TEXT and isinstance(v, str) and len(v) <= 200:
            out[k] = v
        elif k in _NUMBER and isinstance(v, int | float) and not isinstance(v, bool) and v >= 0:
            out[k] = v
        elif k == "rdma" and isinstance(v, bool):
            out[k] = v
        elif k == "split" and isinstance(v, list) and all(type(x) is int for x in v):
            out[k] = v
    return out


def clean_view(view) -> dict | None:
    """The launcher's view (JSON text through an agent: trusted for its sender, not for its
    shape) reduced to well-formed nodes, cables, ring, plan and machine; None if no object."""
    if not isinstance(view, dict):
        return None

    def items(key: str) -> list:
        value = view.get(key)
        return value if isinstance(value, list) else []

    nodes = [n for n in map(_clean, items("nodes")) if "name" in n]
    cables = [c for c in map(_clean, items("cables")) if "a" in c and "b" in c]
    ring = [r for r in items("ring") if isinstance(r, str) and len(r) <= 200]
    plan, machine = _clean(view.get("plan")), _clean(view.get("machine"))
    return {"nodes": nodes, "cables": cables, "ring": ring, "plan": plan, "machine": machine}


def cluster_static(model_name: str, info: dict, view: dict | None) -> dict:
    """The snapshot's model, plan, nodes, cables and ring, from /health's info (what every rank
    holds and its memory) and the launcher's view (chips, memory, cables, prediction)."""
    view = view or {}
    ranks = sorted(info.get("nodes", []), key=lambda n: n["rank"])
    names = node_names([n["host"] for n in ranks])
    known = {n.get("name"): n for n in view.get("nodes", [])}
    machine = view.get("machine") or {}  # one machine's facts, for every rank on it
    nodes = []
    for name, rank in zip(names, ranks):
        node = {
            "name": name,
            "rank": rank["rank"],
            "address": None,
            "chip": None,
            "memory_total": None,
            "memory_usable": None,
            "wired_limit": None,
        }
        node |= {k: v for k, v in machine.items() if k in node}
        node |= {k: v for k, v in known.get(rank["host"], {}).items() if k in node and v}
        node |= {
            "memory_used": rank.get("peak_rss"),
            "layers": rank.get("layers"),
            "experts": rank.get("experts"),
            "weights": rank.get("weights"),
            "bytes_per_token": None,
            "heartbeat_age": 0.0 if rank["rank"] == 0 else None,
            "state": "ready",
            "load": None,
            "ranks": [rank["rank"]],
        }
        nodes.append(node)
    plan = {
        "parallel": info.get("parallel"),
        "backend": info.get("backend"),
        "split": info.get("split"),
        "predicted_tps": None,
        "link": None,
    } | (view.get("plan") or {})
    by_host = dict(zip([n["host"] for n in ranks], names))
    return {
        "model": {
            "name": model_name,
            "model_type": info.get("model_type"),
            "context": info.get("context"),
        },
        "plan": plan,
        "nodes": nodes,
        "cables": [c for c in view.get("cables", []) if c["a"] in by_host and c["b"] in by_host],
        "ring": names,  # the ranks' order is the ring's
    }


def load_figures(done: int, total: int, began: float, at: float, now: float) -> dict:
    """A rank's loading as the page shows it: bytes read of all, bytes a second, seconds left.
    The rate runs to now while it loads (a rank that stalls sees it fall and its time left
    grow), to its last count once it is done."""
    if done >= total:
        return {"done": done, "total": total, "rate": done / max(at - began, 1e-3), "eta": 0.0}
    rate = done / max(now - began, 1e-3)
    return {
        "done": done,
        "total": total,
        "rate": rate,
        "eta": (total - done) / rate if rate else None,
    }


def loading_static(model_name: str, info: dict, view: dict | None, hosts: list[str]) -> dict:
    """The snapshot while the ranks load: each rank (named as it will be once loaded) with what
    the launcher knows of its node, "loading"."""
    ranks = [{"rank": r, "host": h} for r, h in enumerate(hosts)]
    static = cluster_static(model_name, info | {"nodes": ranks}, view)
    for node in static["nodes"]:
        node["state"] = "loading"
    return static


class LoadingSample:
    """The tick's figures while the ranks load: each rank's bytes read (loads() -> rank: done,
    total, when its first and last counts came)."""

    def __init__(self, names: list[str], loads: Callable[[], dict]) -> None:
        self.names, self.loads = names, loads

    def __call__(self) -> dict:
        nodes, now = {}, time.monotonic()
        for rank, (done, total, began, at) in self.loads().items():
            if rank < len(self.names):
                nodes[self.names[rank]] = {"load": load_figures(done, total, began, at, now)}
        return {"nodes": nodes}


class ClusterSample:
    """The tick's figures: requests running and waiting, the prefix cache's hits, speculative
    acceptance, every rank's heartbeat age, and (read through the ring only while no request
    runs, at most every STATS_EVERY s) each rank's bytes sent per token and memory."""

    def __init__(
        self,
        coordinator,
        inflight,
        names: list[str],
        tokens: Callable[[], int],
        ages: Callable[[], dict[int, float]] | None = None,
    ) -> None:
        self.coordinator, self.inflight, self.names = coordinator, inflight, names
        self.tokens, self.ages = tokens, ages
        self._last: tuple[int, dict[int, int]] | None = None  # tokens and bytes at the last read
        self._read_at = 0.0
        self._nodes: dict[str, dict] = {}

    def __call__(self) -> dict:
        c = self.coordinator
        nodes = {name: dict(values) for name, values in self._nodes.items()}
        for rank, age in (self.ages() if self.ages else {}).items():
            if rank < len(self.names):
                nodes.setdefault(self.names[rank], {})["heartbeat_age"] = round(age, 2)
        out = {"running": len(self.inflight.jobs), "waiting": c.pending(), "nodes": nodes}
        prefix = c.prefix
        if prefix is not None:
            figures = {"hits": prefix.hits, "lookups": prefix.lookups, "bytes": prefix.nbytes}
            out["prefix_cache"] = figures | {"cached_tokens": prefix.cached_tokens}
        spec = c.speculation
        if spec.drafted:
            out["acceptance"] = spec.accepted / spec.drafted
        self._read_traffic()
        return out

    def _read_traffic(self) -> None:
        """Each rank's bytes per token since the last read, when the ring is idle."""
        now = time.monotonic()
        tokens = self.tokens()
        idle = not self.inflight.jobs and self.coordinator.pending() == 0
        fresh = self._last is None or tokens != self._last[0]
        if not idle or not fresh or now - self._read_at < STATS_EVERY:
            return
        self._read_at = now
        ranks = _stats(self.coordinator)
        if ranks is None:
            return
        sent = {r["rank"]: r["data_bytes"] + r["control_bytes"] for r in ranks}
        for r in ranks:
            if r["rank"] >= len(self.names):
                continue
            figures = self._nodes.setdefault(self.names[r["rank"]], {})
            figures["memory_used"] = r["peak_rss"]
            if self._last is not None and tokens > self._last[0]:
                made = tokens - self._last[0]
                figures["bytes_per_token"] = (sent[r["rank"]] - self._last[1][r["rank"]]) / made
        self._last = (tokens, sent)


def _stats(coordinator) -> list[dict] | None:
    """Every rank's counters, through the ring (None when it does not answer within 10 s)."""
    from mlxdist.serving.events import Stats
    from mlxdist.serving.job import Job

    # Read on the ticks' thread, not on an event loop: a plain queue takes the answer.
    job = Job(prompt=[], max_tokens=0, stats=True, events=queue.Queue())
    coordinator.submit(job)
    try:
        event = job.events.get(timeout=10)
    except queue.Empty:
        return None
    return event.ranks if isinstance(event, Stats) else None
