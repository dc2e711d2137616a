"""Authentication before everything: an ASGI middleware that verifies each request's signature,
reading no more of a stranger's request than it must, then replays the body it read."""

from __future__ import annotations

import asyncio
import json

from ..auth import AuthError, Verifier
from .errors import Refused


class _Disconnected(Exception):
    pass


def _target(scope: dict) -> str:
    path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string") or b""
    return (path + (b"?" + query if query else b"")).decode("latin-1")


async def _send_json(send, status: int, payload: dict, close: bool = False) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if close:  # the body may be unread: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class SignedOnly:
    """ASGI middleware: reads the body (capped, timed) and verifies the signature, or answers."""

    def __init__(self, app, verifier: Verifier, max_body: int, body_timeout: float):
        self.app = app
        self.verifier = verifier
        self.max_body = max_body
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await send({"type": "websocket.close", "code": 1008})
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self.verifier.check_headers(headers)  # before reading a body from a stranger
            body = await self._read_body(receive, headers)
            self.verifier.verify(scope["method"], _target(scope), body, headers)
        except AuthError as e:
            return await _send_json(send, e.status, {"error": e.reason}, close=True)
        except Refused as e:
            return await _send_json(send, e.status, {"error": e.message}, close=True)
        except _Disconnected:
            return None
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive, headers: dict[str, str]) -> bytes:
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise Refused(413, f"body larger than {self.max_body} bytes")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise Refused(408, "the body did not arrive in time") from None
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise Refused(413, f"body larger than {self.max_body} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
