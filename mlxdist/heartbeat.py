"""Heartbeats between rank 0 and every other rank, outside MLX and its ring.

A rank that dies closes its connection; a rank that is stopped or hung stops beating. Either way
rank 0 hears of it within TIMEOUT even while its main thread is blocked inside a collective, and
the other ranks leave as soon as rank 0 goes away, so a blocked ring receive never holds a rank.

Lines over TCP: "hello RANK TOKEN NODE" once from each rank, then "beat" both ways every INTERVAL,
and "bye" from a rank that leaves on purpose.
"""

from __future__ import annotations

import hmac
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

INTERVAL = 1.0
TIMEOUT = 5.0  # no beat for this long: the peer is stopped or hung
CONNECT_TIMEOUT = 30.0  # every rank says hello this soon after rank 0 starts
TOKEN_ENV = "MLXDIST_HEARTBEAT_TOKEN"
PEER_GONE = 5  # the exit code of a rank whose rank 0 went away


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
        self._seen: dict[int, float] = {}
        self._conns: dict[int, socket.socket] = {}
        self._left: set[int] = set()
        self._lock = threading.Lock()
        self._failed = threading.Event()
        self._started = time.monotonic()
        self._server = socket.create_server(address)
        self.failure: str | None = None

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
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        reader = conn.makefile("r", encoding="utf-8", errors="replace")
        try:
            hello = reader.readline(512).split(maxsplit=3)
        except OSError:
            hello = []
        rank = self._register(conn, hello)
        if rank is None:
            conn.close()
            return
        conn.settimeout(None)  # the watcher judges silence; the reader only waits
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
                silent = [r for r, t in self._seen.items() if now - t > TIMEOUT]
                silent = [r for r in silent if r not in self._left]
                missing = [r for r in range(1, self.size) if r not in self._conns]
            for conn in conns.values():
                try:
                    conn.sendall(b"beat\n")
                except OSError:
                    pass  # its reader reports the loss
            if silent:
                self._fail(
                    f"{self.name(silent[0])} failed: no heartbeat for {TIMEOUT:.0f} s "
                    "(the process is stopped or hung)"
                )
            elif missing and now - self._started > CONNECT_TIMEOUT:
                self._fail(f"{self.name(missing[0])} failed: it never sent a heartbeat")

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


def follow(address: tuple[str, int], rank: int, node: str) -> Callable[[], None]:
    """Rank r's side: beats to rank 0, and ends this process (exit PEER_GONE) when rank 0 is
    gone or silent. Returns bye(), for a rank that leaves on purpose."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        try:
            conn = socket.create_connection(address, timeout=TIMEOUT)
            break
        except OSError as e:
            if time.monotonic() > deadline:
                _leave(rank, f"cannot reach rank 0's heartbeat at {address[0]}:{address[1]}: {e}")
            time.sleep(0.2)
    conn.sendall(f"hello {rank} {_token()} {node}\n".encode())
    lock = threading.Lock()

    def beat() -> None:
        while True:
            try:
                with lock:
                    conn.sendall(b"beat\n")
            except OSError:
                return  # the listener below leaves
            time.sleep(INTERVAL)

    def listen() -> None:
        try:
            while conn.recv(64):
                pass
            why = "rank 0 closed the heartbeat"
        except TimeoutError:
            why = f"no heartbeat from rank 0 for {TIMEOUT:.0f} s"
        except OSError as e:
            why = f"the heartbeat to rank 0 failed: {e}"
        _leave(rank, why)

    def bye() -> None:
        with lock:
            try:
                conn.sendall(b"bye\n")
            except OSError:
                pass

    for target in (beat, listen):
        threading.Thread(target=target, daemon=True).start()
    return bye


def _leave(rank: int, why: str) -> None:
    # The main thread may be blocked in a ring receive that will never return: leave from here.
    print(f"[rank {rank}] leaving: {why}", file=sys.stderr, flush=True)
    os._exit(PEER_GONE)
