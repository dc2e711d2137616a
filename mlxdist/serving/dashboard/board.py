"""The dashboard's live state of one cluster: what it is made of, its figures second by second,
what happened to it; and the pages watching it, each fed through a queue of its own.

The numbers come in from the API's event loop (tokens, answers, refusals) and from other
threads (a node failure on the heartbeat's); pages are fed only from the loop.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

SERIES = 300  # ticks kept: five minutes at one a second
EVENTS = 200  # a node failed, a plan changed, ...: kept apart from the refusals
REFUSALS = 50  # refused requests kept; more than one a second are told as a count
EVENT_TEXT = 500  # characters of an event's text
ANSWERS = 300
TICK = 1.0  # seconds between ticks
PAGE_QUEUE = 64  # messages a slow page may fall behind before it is dropped
PAGES = 16  # pages watching at once: more are refused, so no one can open streams without end

_FAILED_RANK = re.compile(r"^rank (\d+)\b")


def sse(kind: str, data: dict) -> str:
    """One server-sent event; JSON has no raw newline, so one data line holds it."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class TooManyPages(Exception):
    """More pages watch than PAGES."""


class Board:
    """kind: "cluster" (ranks serving a model) or "agents" (the agents before a launch).
    static: the snapshot's model, plan, nodes, cables and ring. sample() -> the tick's running,
    waiting, prefix_cache, acceptance and per-node figures, read once a tick."""

    def __init__(
        self,
        kind: str,
        static: dict | None = None,
        sample: Callable[[], dict] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kind = kind
        self.instance = secrets.token_hex(8)
        self.clock = clock
        self.sample = sample or (lambda: {})
        self._static = {"model": None, "plan": None, "nodes": [], "cables": [], "ring": []}
        self._static |= static or {}
        self.series: deque[dict] = deque(maxlen=SERIES)
        self.answers: deque[dict] = deque(maxlen=ANSWERS)
        self.events: deque[dict] = deque(maxlen=EVENTS)
        self.refusals: deque[dict] = deque(maxlen=REFUSALS)
        self.tokens = 0  # generated since the start, counted on the loop
        self.answered = 0
        self._counted = (0, clock())  # tokens and time at the last tick
        # Answers since the last tick, bounded: no tick runs until a page first looks.
        self._new_answers: deque[dict] = deque(maxlen=ANSWERS)
        self._refused_at = 0.0  # when a refusal was last told
        self._held: tuple[int, str] = (0, "")  # refusals since then, and the last one's text
        self._said = ""  # the last figure that could not be read, told once
        self._live: dict[str, dict] = {}  # per node, merged into the next tick
        self._pages: set[asyncio.Queue] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._ticking = False
        self._failure_told: threading.Event | None = None

    # ---- what happens (any thread) ----

    def set_static(self, static: dict) -> None:
        """A new make-up (nodes, cables, ring, model, plan): every page gets a full state."""
        with self._lock:
            self._static |= static
        self._send_state()

    def update_nodes(self, figures: dict[str, dict]) -> None:
        """Per node figures (memory_used, state, heartbeat_age, ...): kept in the nodes, and in
        the next tick."""
        with self._lock:
            for node in self._static["nodes"]:
                if node["name"] in figures:
                    node |= figures[node["name"]]
            for name, values in figures.items():
                self._live.setdefault(name, {}).update(values)

    def event(self, kind: str, text: str, node: str | None = None):
        """Something happened: a node failed, a request was refused, a plan changed. Returns
        the message's hand-over to the pages (a threading.Event), or None when none watch."""
        # Bounded: a refusal's path or Host header is whatever a stranger sent.
        record = {"t": self.clock(), "kind": kind, "text": text[:EVENT_TEXT], "node": node}
        with self._lock:
            (self.refusals if kind == "refused" else self.events).append(record)
        return self._publish(sse("event", record))

    def refused(self, text: str) -> None:
        """A request refused. Strangers can send them without end: at most one a second is
        told, the rest as a count at the next tick, and they never push out other events."""
        now = self.clock()
        with self._lock:
            held, _ = self._held
            if now - self._refused_at < 1.0:
                self._held = (held + 1, text)
                return
            self._refused_at = now
        self.event("refused", text)

    def tell_held_refusals(self) -> None:
        with self._lock:
            (held, text), self._held = self._held, (0, "")
            if held:
                self._refused_at = self.clock()
        if held:
            self.event("refused", f"{held} more refused in the last seconds; the last: {text}")

    def fail(self, message: str) -> None:
        """A node failed (the heartbeat's message, "rank N on node HOST failed: ..."): the node
        is marked and every page told, before the server goes away."""
        match = _FAILED_RANK.match(message)
        node = None
        if match:
            rank = int(match.group(1))
            node = next((n["name"] for n in self.nodes() if n.get("rank") == rank), None)
        if node is not None:
            self.update_nodes({node: {"state": "failed"}})
            if node not in message:  # ranks on one host: the page's own name for it first
                message = f"{node}: {message}"
        self._failure_told = self.event("failed", message, node)

    def wait_idle(self, timeout: float) -> bool:
        """True once the failure's message is in every page's queue and each queue is empty
        (its last messages written), within timeout: the server may go away after."""
        deadline = time.monotonic() + timeout
        if self._failure_told is not None:
            self._failure_told.wait(timeout)
        while any(not q.empty() for q in list(self._pages)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return all(q.empty() for q in list(self._pages))

    # ---- what the API's loop counts ----

    def token(self, n: int = 1) -> None:
        self.tokens += n

    def answer(self, ttft: float, tps: float, tokens: int) -> None:
        record = {"t": self.clock(), "ttft": ttft, "tps": tps, "tokens": tokens}
        with self._lock:
            self.answers.append(record)
            self._new_answers.append(record)
            self.answered += 1

    # ---- what pages read ----

    def nodes(self) -> list[dict]:
        with self._lock:
            return [dict(n) for n in self._static["nodes"]]

    def snapshot(self) -> dict:
        with self._lock:
            static = json.loads(json.dumps(self._static))  # a copy no other thread changes
            return static | {
                "kind": self.kind,
                "instance": self.instance,
                "live": self.series[-1] if self.series else None,
                "series": list(self.series),
                "ttft": list(self.answers),
                "events": sorted([*self.events, *self.refusals], key=lambda e: e["t"]),
            }

    def tick(self) -> dict:
        """The figures of the interval since the last tick (and the sampled ones)."""
        now = self.clock()
        before, then = self._counted
        self._counted = (self.tokens, now)
        extra = self.sample()
        with self._lock:
            live, self._live = self._live, {}
            answers, self._new_answers = self._new_answers, []
        for name, values in extra.pop("nodes", {}).items():
            live.setdefault(name, {}).update(values)
        record = {
            "t": now,
            "tps": (self.tokens - before) / max(now - then, 1e-6),
            "running": 0,
            "waiting": 0,
            "answers": self.answered,
            "tokens": self.tokens,
            "prefix_cache": None,
            "acceptance": None,
        }
        record |= extra | {"nodes": live}
        with self._lock:
            self.series.append(record)  # the answers are in the snapshot's own list
            for node in self._static["nodes"]:  # a page that opens later reads them too
                node |= live.get(node["name"], {})
        return record | {"ttft": list(answers)}

    def start(self, every: float = TICK) -> None:
        """Ticks on a thread of its own from now on (once a page first looks: a server no one
        watches does no work for it), each tick sent to every page."""
        with self._lock:
            if self._ticking:
                return
            self._ticking = True

        def run() -> None:
            while True:
                time.sleep(every)
                try:
                    record = self.tick()
                except Exception as e:  # a figure that cannot be read must not stop the ticks
                    said = f"the dashboard could not read a figure: {e}"
                    if said != self._said:  # once, not every second
                        self._said = said
                        self.event("info", said)
                    continue
                self._publish(sse("tick", record))
                self.tell_held_refusals()

        threading.Thread(target=run, name="dashboard-ticks", daemon=True).start()

    async def stream(self) -> AsyncIterator[str]:
        """A page's feed: the state, then ticks and events as they come."""
        self._loop = asyncio.get_running_loop()
        self.start()
        if len(self._pages) >= PAGES:
            raise TooManyPages(f"{PAGES} pages watch this cluster already")
        queue: asyncio.Queue = asyncio.Queue(PAGE_QUEUE)
        self._pages.add(queue)
        try:
            yield sse("state", self.snapshot())
            while True:
                message = await queue.get()
                if message is None:  # fell behind: it reads a whole state when it comes back
                    return
                yield message
        finally:
            self._pages.discard(queue)

    # ---- feeding pages ----

    def _send_state(self) -> None:
        self._publish(sse("state", self.snapshot()))

    def _publish(self, message: str) -> threading.Event | None:
        """Hands message to every page's queue on the loop (from any thread; from the loop's
        own, on its next turn); the Event is set once it is there."""
        loop = self._loop
        if loop is None or not self._pages:
            return None
        done = threading.Event()

        def put() -> None:
            self._put(message)
            done.set()

        try:
            loop.call_soon_threadsafe(put)
        except RuntimeError:  # the loop has closed: no page is left to tell
            return None
        return done

    def _put(self, message: str) -> None:
        for queue in list(self._pages):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self._pages.discard(queue)
                queue.get_nowait()  # room for the end marker
                queue.put_nowait(None)
