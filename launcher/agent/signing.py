"""Authentication before everything: an ASGI middleware that verifies each request's signature
from its headers alone, reads a body only when they passed (hashing it against the digest they
declare), and signs every answer it lets out, the refusals included."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json

from ..auth import NONCE, AuthError, Declared, Verifier, sign_response
from .errors import Refused

_NONCE_CHARS = set("0123456789abcdef")
VERIFIED = "mlxdist.verified"  # scope key: called once the signed headers pass (guard.py)


class _Disconnected(Exception):
    pass


def _target(scope: dict) -> str:
    path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string") or b""
    return (path + (b"?" + query if query else b"")).decode("latin-1")


def _nonce(headers: dict[str, str]) -> str:
    """The request's nonce to sign the answer over, or "" when it has none worth the name."""
    nonce = headers.get(NONCE.lower(), "")
    return nonce if 16 <= len(nonce) <= 64 and set(nonce) <= _NONCE_CHARS else ""


class _Signer:
    """Wraps send: holds the answer until its body is whole, then sends it signed."""

    def __init__(self, send, secret: bytes, nonce: str, node: str, boot: str):
        self._send, self._secret, self._nonce = send, secret, nonce
        self._node, self._boot = node, boot
        self._start: dict | None = None
        self._body: list[bytes] = []
        self.started = False  # the first byte of an answer went out

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self._start = dict(message)
            return
        if message["type"] != "http.response.body" or self._start is None:
            return await self._send(message)
        self._body.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(self._body)
        self.started = True
        signed = sign_response(
            self._secret, self._nonce, self._start["status"], body, self._node, self._boot
        )
        extra = [(k.lower().encode(), v.encode()) for k, v in signed.items()]
        await self._send(self._start | {"headers": [*self._start.get("headers", []), *extra]})
        await self._send({"type": "http.response.body", "body": body})


async def _send_json(send, status: int, payload: dict, close: bool = False) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if close:  # the body may be unread: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class SignedOnly:
    """ASGI middleware: verifies the signed headers, then reads the body (capped, timed, hashed)
    or answers; every answer goes out signed with the agent's node id and boot id."""

    def __init__(self, app, verifier: Verifier, secret: bytes, max_body: int, body_timeout: float):
        self.app = app
        self.verifier = verifier
        self.secret = secret
        self.max_body = max_body
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await send({"type": "websocket.close", "code": 1008})
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        v = self.verifier
        send = _Signer(send, self.secret, _nonce(headers), v.node_id, v.boot_id)
        try:
            # Nothing of a stranger's body is read: the HMAC covers its declared length and digest.
            declared = v.check_headers(scope["method"], _target(scope), headers)
            if VERIFIED in scope:  # its connection is the launcher's now: never closed for room
                scope[VERIFIED]()
            body = await self._read_body(receive, declared)
        except AuthError as e:
            return await _send_json(send, e.status, {"error": e.reason}, close=True)
        except Refused as e:
            return await _send_json(send, e.status, {"error": e.message}, close=True)
        except _Disconnected:
            return None
        try:
            await self.app(scope, _replay(body, receive), send)
        except Exception as e:  # answered here, signed, rather than unsigned further out
            if send.started:
                raise
            await _send_json(send, 500, {"error": f"internal error: {type(e).__name__}"})

    async def _read_body(self, receive, declared: Declared) -> bytes:
        if declared.length > self.max_body:
            raise Refused(413, f"body larger than {self.max_body} bytes")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        chunks: list[bytes] = []
        digest = hashlib.sha256()
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
            if size > declared.length:
                raise AuthError(400, "the body is longer than the signature declares")
            digest.update(chunk)
            chunks.append(chunk)
            more = message.get("more_body", False)
        if size != declared.length or not hmac.compare_digest(digest.hexdigest(), declared.sha256):
            raise AuthError(400, "the body is not the one the signature declares")
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
