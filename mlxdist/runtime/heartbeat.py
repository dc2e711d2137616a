"""Heartbeats between rank 0 and every other rank, outside MLX and its ring.

A rank that dies closes its connection; a rank that is stopped or hung stops beating. Either way
rank 0 hears of it within TIMEOUT even while its main thread is blocked inside a collective, and
the other ranks leave as soon as rank 0 goes away, so a blocked ring receive never holds a rank.

Lines over TCP: "hello RANK TOKEN NODE" once from each rank, then "beat" both ways every INTERVAL,
"ready" from rank 0 once it serves (silence is judged strictly from then on), and "bye" from a
rank that leaves on purpose.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable

from launcher.rankspec import HEARTBEAT_TOKEN_ENV as TOKEN_ENV
from launcher.rankspec import PEER_GONE

INTERVAL = 1.0
_LOAD_LINE = re.compile(r"load (\d{1,18}) (\d{1,18})", re.ASCII)  # a rank's loading, in bytes
TIMEOUT = 5.0  # no beat for this long once rank 0 serves: the peer is stopped or hung
# While loading, MLX's ring set-up holds the interpreter lock (no beat leaves) until every rank
# has joined, and rank 0 then loads the tokenizer and starts its server: silence is judged more
# leniently until rank 0 says it is ready.
LOAD_TIMEOUT = 120.0
# A connection that has not shown the token yet: it has HELLO_DEADLINE in all to send its hello
# line, and only so many may wait at once, from one address and in all, so strangers cannot pile
# up threads. Both limits are beyond the ranks' own: every rank may connect at once, all from one
# host when they run on one machine. The ranks' own addresses (the ring hostfile's) wait outside
# the strangers' total, and when that total is reached the newest stranger takes the place of the
# oldest of the address holding the most: strangers cannot keep a rank out.
HELLO_DEADLINE = 5.0
PENDING_PER_PEER = 4  # besides one for each rank
PENDING = 32  # besides one for each rank
# A rank whose connection is closed before rank 0's first beat (turned away while strangers
# crowded the port) says hello again, waiting twice as long each time.
RETRIES = 4  # 3.75 s in all
RETRY_WAIT = 0.25


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) as a (host, port) pair."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port)


_kept: str | None = None  # the token rank.main took out of the environment


def keep_token(token: str) -> None:
    """The launch's heartbeat token, taken out of the environment so no child inherits it."""
    global _kept
    _kept = token


def _token() -> str:
    return _kept if _kept is not None else os.environ.get(TOKEN_ENV, "-")


def rank_hosts() -> set[str]:
    """The hosts of the ring hostfile (MLX_HOSTFILE) this rank was given: the ranks' addresses."""
    try:
        with open(os.environ["MLX_HOSTFILE"], encoding="utf-8") as f:
            entries = json.load(f)
    except (KeyError, OSError, ValueError):
        return set()
    hosts = set()
    for entry in entries if isinstance(entries, list) else []:
        for address in entry if isinstance(entry, list) else [entry]:
            host = str(address).rpartition(":")[0]
            if host:
                hosts.add(host.removeprefix("[").removesuffix("]"))
    return hosts


class Monitor:
    """Rank 0's side: listens for ranks 1..size-1 and calls on_failure(message) once, with the
    first rank found dead or hung."""

    def __init__(
        self,
        address: tuple[str, int],
        size: int,
        node: str,
        on_failure: Callable[[str], None],
        known: Iterable[str] = (),
    ):
        self.size = size
        self.known = frozenset(known)  # the ranks' addresses: outside the strangers' total
        self.on_failure = on_failure
        self.nodes = {0: node}
        # A rank that never says hello is as silent as one that stopped beating.
        self._seen = dict.fromkeys(range(1, size), time.monotonic())
        self._conns: dict[int, socket.socket] = {}
        self._left: set[int] = set()
        self._lock = threading.Lock()
        self._failed = threading.Event()
        self._limit = LOAD_TIMEOUT
        self._ready = False
        # Connections yet to say hello, per peer address, oldest first.
        self._pending: dict[str, list[socket.socket]] = {}
        self._server = socket.create_server(address)
        self.failure: str | None = None
        # rank -> bytes of weights read, bytes in all, when (monotonic) its first and its last
        # counts came
        self._loads: dict[int, tuple[int, int, float, float]] = {}

    def ready(self) -> None:
        """Every rank has loaded and rank 0 serves: from now on TIMEOUT of silence is a failure,
        on both sides."""
        with self._lock:
            now = time.monotonic()
            self._seen = {r: max(t, now - INTERVAL) for r, t in self._seen.items()}
            self._limit = TIMEOUT
            self._ready = True
            conns = list(self._conns.values())
        for conn in conns:  # now, before the API answers its first request
            try:
                conn.sendall(b"ready\n")
            except OSError:
                pass  # its reader reports the loss

    def start(self) -> Monitor:
        for target in (self._accept, self._watch):
            threading.Thread(target=target, daemon=True).start()
        return self

    def ages(self) -> dict[int, float]:
        """Seconds since each rank's last heartbeat (rank 0's own: 0), for the dashboard."""
        now = time.monotonic()
        with self._lock:
            return {0: 0.0} | {r: now - t for r, t in self._seen.items()}

    def loads(self) -> dict[int, tuple[int, int, float, float]]:
        """What each rank has said of its loading: (bytes of weights read, bytes in all, when
        its first and its last counts came, on time.monotonic's clock)."""
        with self._lock:
            return dict(self._loads)

    def name(self, rank: int) -> str:
        node = self.nodes.get(rank)
        return f"rank {rank} on node {node}" if node else f"rank {rank}"

    def _accept(self) -> None:
        while not self._failed.is_set():
            try:
                conn, peer = self._server.accept()
            except OSError:
                return
            if not self._wait_hello(conn, peer[0]):
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, peer[0]), daemon=True).start()

    def _wait_hello(self, conn: socket.socket, peer: str) -> bool:
        evicted = None
        with self._lock:
            waiting = self._pending.setdefault(peer, [])
            if len(waiting) >= PENDING_PER_PEER + self.size:
                return False
            strangers = {p: c for p, c in self._pending.items() if c and p not in self.known}
            if peer not in self.known and sum(map(len, strangers.values())) >= PENDING + self.size:
                evicted = max(strangers.values(), key=len).pop(0)
            waiting.append(conn)
        if evicted is not None:  # its reader sees the end, and its thread leaves
            try:
                evicted.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return True

    def _heard_hello(self, conn: socket.socket, peer: str) -> None:
        with self._lock:
            waiting = self._pending.get(peer, [])
            if conn in waiting:  # not when it was evicted
                waiting.remove(conn)
            if not waiting:
                self._pending.pop(peer, None)

    def _serve(self, conn: socket.socket, peer: str) -> None:
        try:
            hello = _read_hello(conn).split(maxsplit=3)
        finally:
            self._heard_hello(conn, peer)
        rank = self._register(conn, hello)
        if rank is None:
            conn.close()
            return
        conn.settimeout(None)  # the watcher judges silence; the reader only waits
        reader = conn.makefile("r", encoding="utf-8", errors="replace")
        try:
            for line in reader:
                if line.strip() == "bye":
                    with self._lock:
                        self._left.add(rank)
                    return
                loaded = _load_line(line)
                with self._lock:
                    self._seen[rank] = time.monotonic()  # any line is a beat
                    if loaded is not None:  # kept with when its loading began, and now
                        now = time.monotonic()
                        began = self._loads.get(rank, (0, 0, now))[2]
                        self._loads[rank] = (*loaded, began, now)
        except OSError:
            pass
        if rank not in self._left:
            self._fail(
                f"{self.name(rank)} failed: its connection was lost (the process "
                "exited or its host went away)"
            )

    def _register(self, conn: socket.socket, hello: list[str]) -> int | None:
        # A stranger who cannot show the token, or a second hello for a rank, is turned away.
        if len(hello) != 4 or hello[0] != "hello" or not hello[1].isdigit():
            return None
        rank = int(hello[1])
        if not 0 < rank < self.size or not hmac.compare_digest(hello[2], _token()):
            return None
        with self._lock:
            if rank in self._conns:
                return None
            self._conns[rank] = conn
            self._seen[rank] = time.monotonic()
            self.nodes[rank] = hello[3].strip()
        return rank

    def _watch(self) -> None:
        while not self._failed.wait(INTERVAL / 2):
            now = time.monotonic()
            with self._lock:
                conns = dict(self._conns)
                limit = self._limit
                beat = b"beat\nready\n" if self._ready else b"beat\n"  # repeated: cheap
                silent = [r for r, t in self._seen.items() if now - t > limit]
                silent = [r for r in silent if r not in self._left]
            for conn in conns.values():
                try:
                    conn.sendall(beat)
                except OSError:
                    pass  # its reader reports the loss
            if silent and silent[0] not in conns:
                self._fail(f"{self.name(silent[0])} failed: it never sent a heartbeat")
            elif silent:
                self._fail(
                    f"{self.name(silent[0])} failed: no heartbeat for {limit:.0f} s "
                    "(the process is stopped or hung)"
                )

    def _fail(self, message: str) -> None:
        with self._lock:
            if self._failed.is_set():
                return
            self.failure = message
            self._failed.set()
        self.on_failure(message)

    def release(self) -> None:
        """Closes every connection: each other rank then leaves."""
        self._failed.set()
        with self._lock:
            conns = list(self._conns.values())
        for conn in [self._server, *conns]:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


def _read_hello(conn: socket.socket) -> str:
    """The first line, read within HELLO_DEADLINE in all (a byte at a time: nothing after it is
    taken from the reader that follows); "" when it does not come."""
    deadline = time.monotonic() + HELLO_DEADLINE
    line = b""
    try:
        while len(line) < 512:
            left = deadline - time.monotonic()
            if left <= 0:
                return ""
            conn.settimeout(left)
            byte = conn.recv(1)
            if byte in (b"", b"\n"):
                break
            line += byte
    except OSError:
        return ""
    return line.decode("utf-8", errors="replace")


class Follower:
    """Rank r's side: beats to rank 0, and ends this process (exit PEER_GONE) when rank 0 is
    gone, or silent for TIMEOUT once it has said it is ready."""

    def __init__(self, address: tuple[str, int], rank: int, node: str):
        self.rank = rank
        self._address = address
        self._hello = f"hello {rank} {_token()} {node}\n".encode()
        self._limit = LOAD_TIMEOUT
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + LOAD_TIMEOUT
        self._tries = 0  # hellos said again
        self._gone = threading.Event()  # the listener has given up
        while True:
            try:
                self._conn = self._connect()
                break
            except OSError as e:
                if time.monotonic() > self._deadline:
                    host, port = address
                    _leave(rank, f"cannot reach rank 0's heartbeat at {host}:{port}: {e}")
                time.sleep(0.2)
        for target in (self._beat, self._listen):
            threading.Thread(target=target, daemon=True).start()

    def _connect(self) -> socket.socket:
        conn = socket.create_connection(self._address, timeout=INTERVAL)
        try:
            conn.sendall(self._hello)
        except OSError:
            conn.close()
            raise
        conn.settimeout(INTERVAL)
        return conn

    def _again(self) -> bool:
        """After a connection closed before rank 0's first beat: a new one, said hello on, within
        RETRIES tries in all and the start-up deadline; False when none was made."""
        while self._tries < RETRIES:
            wait = RETRY_WAIT * 2**self._tries
            self._tries += 1
            if time.monotonic() + wait > self._deadline:
                return False
            print(
                f"[rank {self.rank}] the heartbeat to rank 0 closed before its first beat: "
                f"saying hello again in {wait:.2f} s",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(wait)
            try:
                conn = self._connect()
            except OSError:
                continue
            with self._lock:
                self._conn.close()
                self._conn = conn
            return True
        return False

    def loading(self, done: int, total: int) -> None:
        """Tells rank 0 how far this rank's loading has come (a beat too)."""
        with self._lock:
            try:
                self._conn.sendall(f"load {int(done)} {int(total)}\n".encode())
            except OSError:
                pass  # the listener says hello again, or leaves

    def bye(self) -> None:
        """Leaving on purpose: rank 0 is not to count it as a failure."""
        with self._lock:
            try:
                self._conn.sendall(b"bye\n")
            except OSError:
                pass

    def _beat(self) -> None:
        while not self._gone.is_set():
            try:
                with self._lock:
                    self._conn.sendall(b"beat\n")
            except OSError:
                pass  # the listener says hello again, or leaves
            time.sleep(INTERVAL)

    def _listen(self) -> None:
        while True:
            why, heard_any = self._hear()
            if heard_any or not self._again():
                self._gone.set()
                _leave(self.rank, why)
                return

    def _hear(self) -> tuple[str, bool]:
        """Reads rank 0's beats until the connection ends: why it ended, and whether rank 0 had
        beaten on it."""
        heard, tail, heard_any = time.monotonic(), b"", False
        try:
            while True:
                try:
                    data = self._conn.recv(64)
                    if not data:
                        return "rank 0 closed the heartbeat", heard_any
                    heard, tail, heard_any = time.monotonic(), (tail + data)[-16:], True
                    if b"ready" in tail:
                        self._limit = TIMEOUT
                except TimeoutError:
                    if time.monotonic() - heard > self._limit:
                        _leave(self.rank, f"no heartbeat from rank 0 for {self._limit:.0f} s")
        except OSError as e:
            return f"the heartbeat to rank 0 failed: {e}", heard_any


def _load_line(line: str) -> tuple[int, int] | None:
    """(done, total) of a "load DONE TOTAL" line, else None (a plain beat)."""
    match = _LOAD_LINE.fullmatch(line.strip())
    if match is None:
        return None
    done, total = int(match.group(1)), int(match.group(2))
    return (done, total) if done <= total else None


def _leave(rank: int, why: str) -> None:
    # The main thread may be blocked in a ring receive that will never return: leave from here.
    print(f"[rank {rank}] leaving: {why}", file=sys.stderr, flush=True)
    os._exit(PEER_GONE)
