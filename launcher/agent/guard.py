"""Capacity goes to the authenticated: connection admission for the agent's HTTP server.

uvicorn's own limit (limit_concurrency) counts every open connection, so 32 idle sockets from a
stranger made every signed request a 503. Instead, a connection is *unverified* from accept until
a request on it shows signed headers whose HMAC passes (SignedOnly checks them before reading the
body, and marks the connection verified there), and only unverified connections are limited:
- each must finish its request headers within HEADER_DEADLINE of accept (or, on a kept-alive
  connection, of the next request's first byte), else it is closed: idle and dribbling sockets go;
- at most PER_PEER unverified connections per peer address: more are closed at accept;
- at most UNVERIFIED in all; when full, the oldest unverified connection of the peer holding the
  most is closed to make room, so a stranger's pile never keeps out a newcomer from elsewhere.
Verified connections count against nothing and are never closed to make room: a 64 MiB upload
is safe from the first moment its headers verify, however many strangers arrive meanwhile.
An idle kept-alive connection (only a verified one gets an answer that keeps it open) stays
KEEP_ALIVE seconds, well past the launcher's own 5 s keep-alive expiry, so the launcher never
sends a request on a connection the agent is closing at that same instant.

It is done in uvicorn's h11 protocol (subclassed, passed as Config(http=...)): it sees accept,
every byte and the end of the headers, which is all the deadline needs; an asyncio accept guard
in front of uvicorn could not tell when the headers ended.
"""

from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol

from .signing import VERIFIED

HEADER_DEADLINE = 5.0  # seconds from accept (or a request's first byte) to the end of its headers
KEEP_ALIVE = 15.0  # seconds an idle kept-alive connection stays open (the launcher's: 5 s)
PER_PEER = 8  # unverified connections from one address
UNVERIFIED = 16  # unverified connections in all


class Guard:
    """The unverified connections, per peer and oldest first; runs on the event loop only."""

    def __init__(
        self,
        per_peer: int = PER_PEER,
        unverified: int = UNVERIFIED,
        header_deadline: float = HEADER_DEADLINE,
    ):
        self.per_peer = per_peer
        self.unverified = unverified
        self.header_deadline = header_deadline
        self._peers: dict[str, dict[object, None]] = {}  # peer -> its unverified, oldest first
        self._order: dict[object, tuple] = {}  # every unverified -> (peer, addr), oldest first
        self._by_addr: dict[tuple, object] = {}

    def admit(self, conn, peer: str, addr: tuple) -> bool:
        """Whether conn may stay; may close an older unverified connection to make room."""
        mine = self._peers.get(peer, {})
        if len(mine) >= self.per_peer:
            return False
        if len(self._order) >= self.unverified:
            self._close(self._victim(mine))
        self._peers.setdefault(peer, {})[conn] = None
        self._order[conn] = (peer, addr)
        self._by_addr[addr] = conn
        return True

    def _victim(self, mine: dict) -> object:
        heaviest = max(self._peers.values(), key=len)
        if mine and len(mine) + 1 >= len(heaviest):
            return next(iter(mine))  # the newcomer's own peer holds the most: its oldest goes
        if len(heaviest) > 1:
            return next(iter(heaviest))
        return next(iter(self._order))  # one each: the oldest of all

    def _close(self, conn) -> None:
        self.forget(conn)
        conn.transport.abort()

    def verified(self, addr: tuple) -> None:
        """A request on the connection at addr (client, server) passed the signature check."""
        conn = self._by_addr.get(addr)
        if conn is not None:
            self.forget(conn)

    def forget(self, conn) -> None:
        known = self._order.pop(conn, None)
        if known is None:
            return
        peer, addr = known
        mine = self._peers[peer]
        mine.pop(conn, None)
        if not mine:
            del self._peers[peer]
        self._by_addr.pop(addr, None)

    def count(self) -> int:
        return len(self._order)


class MarkVerified:
    """ASGI middleware outside SignedOnly: gives each request the callback (scope[VERIFIED]) that
    SignedOnly calls once the request's signed headers pass, before its body is read."""

    def __init__(self, app, guard: Guard):
        self.app = app
        self.guard = guard

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            addr = (scope.get("client"), scope.get("server"))
            scope[VERIFIED] = lambda: self.guard.verified(addr)
        await self.app(scope, receive, send)


def guarded_protocol(guard: Guard) -> type[H11Protocol]:
    """uvicorn's h11 protocol with guard's admission and header deadline."""

    class Guarded(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._deadline = None
            self._seen = None  # the request cycle whose headers are known to be complete
            self._waiting = False  # kept alive after an answer; no byte of the next one yet
            peer = self.client[0] if self.client else "?"
            if not guard.admit(self, peer, (self.client, self.server)):
                transport.abort()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(guard.header_deadline, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            guard.forget(self)
            self.transport.abort()

        def _check_headers(self) -> None:
            # uvicorn makes a new cycle once a request's headers are complete.
            if self.cycle is not None and self.cycle is not self._seen:
                self._seen = self.cycle
                self._waiting = False
                self._disarm()

        def data_received(self, data: bytes) -> None:
            if self._waiting:  # the next request's first byte on a kept-alive connection
                self._waiting = False
                self._arm()
            super().data_received(data)
            self._check_headers()

        def on_response_complete(self) -> None:
            # Idle, uvicorn's keep-alive timer (KEEP_ALIVE) closes it; the header deadline
            # counts again from the next request's first byte.
            self._waiting = not self.transport.is_closing()
            super().on_response_complete()
            self._check_headers()  # a pipelined request may have completed already
            if self._waiting and self.conn.trailing_data[0]:  # part of one came already
                self._waiting = False
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            guard.forget(self)
            super().connection_lost(exc)

    return Guarded
