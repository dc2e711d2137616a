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
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

from launcher.rankspec import HEARTBEAT_TOKEN_ENV as TOKEN_ENV
from launcher.rankspec import PEER_GONE

INTERVAL = 1.0
TIMEOUT = 5.0  # no beat for this long once rank 0 serves: the peer is stopped or hung
# While loading, MLX's ring set-up holds the interpreter lock (no beat leaves) until every rank
# has joined, and rank 0 then loads the tokenizer and starts its server: silence is judged more
# leniently until rank 0 says it is ready.
LOAD_TIMEOUT = 120.0
# A connection that has not shown the token yet: it has HELLO_DEADLINE in all to send its hello
# line, and only so many may wait at once, from one address and in all, so strangers cannot pile
# up threads. Both limits are beyond the ranks' own: every rank may connect at once, all from one
# host when they run on one machine.
HELLO_DEADLINE = 5.0
PENDING_PER_PEER = 4  # besides one for each rank
PENDING = 32  # besides one for each rank


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) as a (host, port) pair."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _token() -> str:
    return os.environ.get(TOKEN_ENV, "-")


class Monitor:
    """Rank 0's side: listens for ranks 1..size-1 and calls on_failure(message) once, with the
    first rank found dead or hung."""

    def __init__(
        self, address: tuple[str, int], size: int, node: str, on_failure: Callable[[str], None]
    ):
        self.size = size
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
        self._pending: dict[str, int] = {}  # connections yet to say hello, per peer address
        self._server = socket.create_server(address)
        self.failure: str | None = None

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

    def name(self, rank: int) -> str:
        node = self.nodes.get(rank)
        return f"rank {rank} on node {node}" if node else f"rank {rank}"

    def _accept(self) -> None:
        while not self._failed.is_set():
            try:
                conn, peer = self._server.accept()
            except OSError:
                return
            if not self._wait_hello(peer[0]):
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, peer[0]), daemon=True).start()

    def _wait_hello(self, peer: str) -> bool:
        with self._lock:
            if self._pending.get(peer, 0) >= PENDING_PER_PEER + self.size:
                return False
            if sum(self._pending.values()) >= PENDING + self.size:
                return False
            self._pending[peer] = self._pending.get(peer, 0) + 1
            return True

    def _heard_hello(self, peer: str) -> None:
        with self._lock:
            self._pending[peer] -= 1
            if not self._pending[peer]:
                del self._pending[peer]

    def _serve(self, conn: socket.socket, peer: str) -> None:
        try:
            hello = _read_hello(conn).split(maxsplit=3)
        finally:
            self._heard_hello(peer)
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
                with self._lock:
                    self._seen[rank] = time.monotonic()
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
        self._limit = LOAD_TIMEOUT
        self._lock = threading.Lock()
        deadline = time.monotonic() + LOAD_TIMEOUT
        while True:
            try:
                self._conn = socket.create_connection(address, timeout=INTERVAL)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    host, port = address
                    _leave(rank, f"cannot reach rank 0's heartbeat at {host}:{port}: {e}")
                time.sleep(0.2)
        self._conn.sendall(f"hello {rank} {_token()} {node}\n".encode())
        self._conn.settimeout(INTERVAL)
        for target in (self._beat, self._listen):
            threading.Thread(target=target, daemon=True).start()

    def bye(self) -> None:
        """Leaving on purpose: rank 0 is not to count it as a failure."""
        with self._lock:
            try:
                self._conn.sendall(b"bye\n")
            except OSError:
                pass

    def _beat(self) -> None:
        while True:
            try:
                with self._lock:
                    self._conn.sendall(b"beat\n")
            except OSError:
                return  # the listener leaves
            time.sleep(INTERVAL)

    def _listen(self) -> None:
        heard, tail = time.monotonic(), b""
        try:
            while True:
                try:
                    data = self._conn.recv(64)
                    if not data:
                        break
                    heard, tail = time.monotonic(), (tail + data)[-16:]
                    if b"ready" in tail:
                        self._limit = TIMEOUT
                except TimeoutError:
                    if time.monotonic() - heard > self._limit:
                        _leave(self.rank, f"no heartbeat from rank 0 for {self._limit:.0f} s")
            why = "rank 0 closed the heartbeat"
        except OSError as e:
            why = f"the heartbeat to rank 0 failed: {e}"
        _leave(self.rank, why)


def _leave(rank: int, why: str) -> None:
    # The main thread may be blocked in a ring receive that will never return: leave from here.
    print(f"[rank {rank}] leaving: {why}", file=sys.stderr, flush=True)
    os._exit(PEER_GONE)
