"""Capacity goes to the authenticated: connection admission for the agent's HTTP server.

uvicorn's own limit (limit_concurrency) counts every open connection, so 32 idle sockets from a
stranger made every signed request a 503. Instead, a connection is *unverified* from accept until
a request on it passes the signature check (MarkVerified sits just inside SignedOnly), and only
unverified connections are limited:
- each must finish its request headers within HEADER_DEADLINE of accept (or of the end of the
  previous answer on a kept-alive connection), else it is closed: idle and dribbling sockets go;
- at most PER_PEER unverified connections per peer address: more are closed at accept;
- at most UNVERIFIED in all; when full, the oldest unverified connection of the peer holding the
  most is closed to make room, so a stranger's pile never keeps out a newcomer from elsewhere.
Verified connections count against nothing: no global limit exists that strangers can fill.

It is done in uvicorn's h11 protocol (subclassed, passed as Config(http=...)): it sees accept,
every byte and the end of the headers, which is all the deadline needs; an asyncio accept guard
in front of uvicorn could not tell when the headers ended.
"""

from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_DEADLINE = 5.0  # seconds from accept (or the last answer) to the end of request headers
KEEP_ALIVE = 5.0  # seconds an idle kept-alive connection stays open
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
    """ASGI middleware placed just inside SignedOnly: a request that reaches it was verified."""

    def __init__(self, app, guard: Guard):
        self.app = app
        self.guard = guard

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            self.guard.verified((scope.get("client"), scope.get("server")))
        await self.app(scope, receive, send)


def guarded_protocol(guard: Guard) -> type[H11Protocol]:
    """uvicorn's h11 protocol with guard's admission and header deadline."""

    class Guarded(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._deadline = None
            self._seen = None  # the request cycle whose headers are known to be complete
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
                self._disarm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._check_headers()

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._arm()  # the next request's headers, on a kept-alive connection
            super().on_response_complete()
            self._check_headers()  # a pipelined request may have started already

        def connection_lost(self, exc) -> None:
            self._disarm()
            guard.forget(self)
            super().connection_lost(exc)

    return Guarded
