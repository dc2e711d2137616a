"""What the agents' dashboard shows of a node's transfers: from each poll of its agent's
GET /transfers, the one to draw (fetch from the Hub, or a push received from the launcher) with
its rate and time left, and the events when one starts, ends or fails.

A fetch is one record from start to end. A push is one file at a time, each an upload record;
the files into one folder make one push, which ends when none has had a byte for IDLE s.
Pure: the caller gives the time of each poll.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from quantize.checkpoint import human_bytes

IDLE = 30.0  # seconds with no byte into a folder: its push has ended (done, or given up)
SMOOTH = 0.5  # weight of the newest interval in the rate


def took(seconds: float) -> str:
    """8 min, 42 s, 1.5 h."""
    if seconds < 120:
        return f"{max(seconds, 0):.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class Seen:
    """One transfer across polls."""

    kind: str  # fetch, push
    what: str  # repo, or the file being pushed
    done: int  # fetch: bytes of its files held; push: bytes received into the folder
    total: int | None
    state: str  # a fetch's; a push's newest file's: receiving, done, failed
    active: bool  # going on: not ended (a push: a byte into its folder within IDLE s)
    moving: bool  # drawn: a fetch going on, or a file of a push being received
    started: float  # the agent's clock
    updated: float  # the agent's clock
    error: str = ""
    files: int = 0  # a push's files finished
    current: int = 0  # a push's bytes of its newest file
    polled: float | None = None  # our clock at the last poll
    rate: float | None = None  # bytes/s


def fetches(answer: dict) -> dict[str, Seen]:
    rows = {}
    for f in answer.get("fetches") or []:
        state = f.get("state", "")
        active = state in ("starting", "running")
        total = int(f.get("total") or 0) or None  # 0 until the Hub listed the files
        times = f.get("started", 0.0), f.get("updated", 0.0)
        done = int(f.get("done") or 0)
        seen = Seen(
            "fetch", f["repo"], done, total, state, active, active, *times, f.get("error") or ""
        )
        rows[f"fetch {f['id']}"] = seen
    return rows


def pushes(answer: dict) -> dict[str, Seen]:
    """The uploads grouped by folder: one push each, drawn as its newest file."""
    now = answer.get("time", 0.0)
    groups: dict[str, list[dict]] = {}
    for u in answer.get("uploads") or []:
        groups.setdefault(posixpath.dirname(u["path"]), []).append(u)
    rows = {}
    for folder, records in groups.items():
        newest = max(records, key=lambda u: u.get("updated", 0.0))
        state = newest.get("state", "")
        active = now - newest.get("updated", 0.0) < IDLE
        seen = Seen(
            "push",
            newest["path"],
            sum(int(u.get("received") or 0) for u in records),
            newest.get("size"),
            state,
            active,
            active and state == "receiving",
            min(u.get("started", 0.0) for u in records),
            newest.get("updated", 0.0),
            newest.get("error") or "",
            files=sum(u.get("state") == "done" for u in records),
            current=int(newest.get("received") or 0),
        )
        rows[f"push {folder}"] = seen
    return rows


class NodeTransfers:
    """One node's transfers across polls; step() each poll."""

    def __init__(self, name: str):
        self.name = name
        self.seen: dict[str, Seen] = {}
        self.first = True  # what the first poll finds is not news

    def step(self, answer: dict | None, now: float) -> tuple[dict | None, list[tuple[str, str]]]:
        """(the node's "transfer" field, [(event kind, text)]) from one poll's answer (None: the
        agent has no transfers route, or did not answer it); now: our clock."""
        fresh = (fetches(answer) | pushes(answer)) if answer else {}
        events = []
        for key, cur in fresh.items():
            old = self.seen.get(key)
            if old is not None:
                _rate(cur, old, now)
            cur.polled = now
            if self.first:
                continue
            if cur.active and (old is None or not old.active):
                events.append(("info", self._started(cur)))
            if not cur.active and (old is None or old.active):
                events += self._ended(cur, old is None)
        self.seen, self.first = fresh, False
        moving = [s for s in fresh.values() if s.moving]
        if not moving:
            return None, events
        return shown(max(moving, key=lambda s: s.started)), events

    def _started(self, s: Seen) -> str:
        if s.kind == "fetch":
            return f"{self.name} fetches {s.what} from the Hub"
        return f"{self.name} receives a push into {posixpath.dirname(s.what)}"

    def _ended(self, s: Seen, unseen: bool) -> list[tuple[str, str]]:
        """The end of a transfer; unseen: it started and ended between two polls."""
        span = took(s.updated - s.started)
        if s.state == "failed":
            what = f"could not fetch {s.what}" if s.kind == "fetch" else f"push of {s.what} failed"
            return [("failed", f"{self.name} {what}: {s.error}")]
        if s.kind == "fetch":
            if s.state != "done":
                return []
            return [("info", f"{self.name} fetched {human_bytes(s.done)} of {s.what} in {span}")]
        folder = posixpath.dirname(s.what)
        if s.state == "done":
            files = f"{s.files} file{'s' if s.files != 1 else ''}"
            text = f"{self.name} received {files}, {human_bytes(s.done)}, into {folder} in {span}"
            return [("info", text)]
        if unseen:
            return []  # a push given up before this dashboard looked
        got = human_bytes(s.current)
        return [
            (
                "info",
                f"{self.name}: the push of {s.what} stopped at {got}: no byte for {IDLE:.0f} s",
            )
        ]


def _rate(cur: Seen, old: Seen, now: float) -> None:
    """cur's rate from the bytes since the last poll, smoothed."""
    cur.rate = old.rate
    if old.polled is None or now <= old.polled:
        return
    fresh = max(cur.done - old.done, 0) / (now - old.polled)
    cur.rate = fresh if old.rate is None else SMOOTH * fresh + (1 - SMOOTH) * old.rate


def shown(s: Seen) -> dict:
    """The node's "transfer" field: what the card draws (a push: its newest file)."""
    done = s.current if s.kind == "push" else s.done
    rate = s.rate
    if rate is None and s.kind == "fetch" and s.updated > s.started:
        rate = s.done / (s.updated - s.started)  # before two polls: the record's own times
    total = s.total
    eta = (total - done) / rate if rate and total is not None and total >= done else None
    return {
        "kind": s.kind,
        "what": s.what,
        "done": done,
        "total": total,
        "rate": rate,
        "eta": eta,
        "state": s.state,
    }
