"""What stands between the network and the API: the Host a request names, its API key, its
body's size, and which browser origins may read the answers (CORS).

Plain ASGI, so a body is counted as it streams and refused before it is all read.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import socket
from dataclasses import dataclass, field

from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

MiB = 2**20
MAX_BODY_MB = 4
OPEN_PATHS = frozenset({"/health"})  # answered without the key (and saying little without it)
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
WRONG_KEY = "Incorrect API key provided."
# What of a body refused for its declared size is still read (and dropped) before the answer.
DRAIN_BYTES = 16 * MiB
DRAIN_SECONDS = 2.0
DRAIN_PAUSE = 0.2  # seconds without a byte that end the draining


@dataclass(frozen=True)
class Policy:
    """The API's guards. api_key None: every request is served, as before keys existed."""

    host: str = "127.0.0.1"  # the address the server is bound to
    api_key: str | None = None
    max_body: int = MAX_BODY_MB * MiB
    docs: bool = False
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted beyond the bound ones
    cors_origins: tuple[str, ...] = ()
    names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", bound_names(self.host, self.allowed_hosts))

    @classmethod
    def from_spec(cls, spec, api_key: str | None) -> Policy:
        """The policy of a rank's settings (launcher/rankspec.py RankSpec) and key."""
        return cls(
            host=spec.host,
            api_key=api_key or None,
            max_body=int(spec.max_body_mb * MiB),
            docs=spec.docs,
            allowed_hosts=tuple(spec.allowed_hosts),
            cors_origins=tuple(spec.cors_origins),
        )

    def authorized(self, authorization: str | None, x_api_key: str | None = None) -> bool:
        """The Authorization header (Bearer) or Anthropic's x-api-key carries the key (always
        true without a key)."""
        if self.api_key is None:
            return True
        if x_api_key is not None and hmac.compare_digest(x_api_key.encode(), self.api_key.encode()):
            return True
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), self.api_key.encode())


def is_open(path: str) -> bool:
    """Served without the key: /health, and the dashboard's page and files, which hold no data
    of the cluster (the page asks for the key; what it shows comes from routes behind it)."""
    return path in OPEN_PATHS or path == "/" or path.startswith("/ui/")


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("0.0.0.0", "::", "")


def bound_names(host: str, extras: tuple[str, ...] = ()) -> frozenset[str]:
    """The names a Host header may give: the bound address, the loopback names when bound there
    (or everywhere), this machine's name (and its .local Bonjour name), and the extras."""
    names = {host.strip("[]").lower(), *(e.strip("[]").lower().rstrip(".") for e in extras)}
    if is_loopback(host) or is_wildcard(host):
        names |= LOOPBACK_NAMES
    me = socket.gethostname().lower().rstrip(".")
    names |= {me, me.split(".")[0], me.split(".")[0] + ".local"}
    return frozenset(names - {""})


def host_name(header: str) -> str:
    """The name in a Host header, without its port: 'a.b:80' -> 'a.b', '[::1]:80' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0].rstrip(".") if header.count(":") <= 1 else header


class TooLarge(HTTPException):
    """Raised from receive(): FastAPI passes an HTTPException through its body parsing."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the server's limit of {_size(limit)}")


def _size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n} bytes"


def error(status: int, message: str, code: str | None, kind: str = "invalid_request_error"):
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return status, json.dumps(body).encode()


# Anthropic's error types for the refusals made here
_ANTHROPIC = {400: "invalid_request_error", 401: "authentication_error", 413: "request_too_large"}


def refusal(path: str, status: int, message: str, code: str | None):
    """A refusal's status and body in the shape of the API at path: Anthropic's clients on
    /v1/messages read `{"type": "error", "error": {"type", "message"}}`, the rest OpenAI's."""
    if path.startswith("/v1/messages"):
        body = {"type": "error", "error": {"type": _ANTHROPIC[status], "message": message}}
        return status, json.dumps(body).encode()
    return error(status, message, code)


class _KeyAndBody:
    """ASGI middleware: the key (every path but OPEN_PATHS), then the body's size."""

    def __init__(self, app, policy: Policy, told=None) -> None:
        self.app = app
        self.policy = policy
        self.told = told or (lambda *_: None)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        p = self.policy
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        key, path = headers.get("x-api-key"), scope["path"]
        if not is_open(path) and not p.authorized(headers.get("authorization"), key):
            given = "authorization" in headers or key is not None
            message, code = (WRONG_KEY, "invalid_api_key") if given else (NO_KEY, None)
            self.told(401, scope["method"], path, "wrong API key" if given else "no API key")
            await _drain(receive)  # as for every refusal: the answer must not be reset
            return await _answer(send, *refusal(path, 401, message, code), bearer=True)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > p.max_body:
            await _drain(receive)
            too_large = TooLarge(p.max_body).detail
            return await _answer(send, *refusal(path, 413, too_large, "body_too_large"))
        started = False
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > p.max_body:  # a chunked body, or one longer than it declared
                    raise TooLarge(p.max_body)
            return message

        async def sending(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except TooLarge as e:  # read by a route outside FastAPI's own body parsing
            if started:
                raise
            await _answer(send, *refusal(path, 413, e.detail, "body_too_large"))


async def _drain(receive, limit: int = DRAIN_BYTES, seconds: float = DRAIN_SECONDS) -> None:
    """Reads and drops what a client still sends of a refused body, up to `limit` bytes or
    `seconds`: a socket closed with unread data resets the connection, and the client, still
    sending, would lose the answer before reading it. Nothing read is kept."""

    async def read() -> None:
        seen = 0
        while seen <= limit:
            # a client that has stopped sending (or never began) is not waited for
            message = await asyncio.wait_for(receive(), DRAIN_PAUSE)
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            seen += len(message.get("body", b""))

    try:
        await asyncio.wait_for(read(), seconds)
    except TimeoutError:
        pass


async def _answer(send, status: int, body: bytes, bearer: bool = False) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if bearer:
        headers.append((b"www-authenticate", b"Bearer"))
    # What a refused client sends after the drain is not read: the connection closes after this.
    headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: the Host check, then CORS for the named origins only (before the key: a
    browser's preflight carries none, and a 401 must reach the page), the key and the body
    limit. told(status, method, path, why): each refusal of a key or a Host, for the
    dashboard's events."""

    def __init__(self, app, policy: Policy, told=None) -> None:
        inner = _KeyAndBody(app, policy, told)
        cors = None
        if policy.cors_origins:
            methods = ["GET", "POST", "DELETE", "OPTIONS"]  # DELETE: /v1/responses/{id}
            # Whatever headers a named origin's page asks to send: the official browser SDKs add
            # their own (x-stainless-*, anthropic-version, anthropic-beta, ...) and a list of
            # them refuses the next one a release adds; the origin itself is what is checked.
            cors = CORSMiddleware(inner, list(policy.cors_origins), methods, ["*"])
        self.front = _Front(inner, cors, policy, inner.told)

    async def __call__(self, scope, receive, send) -> None:
        await self.front(scope, receive, send)


class _Front:
    """The Host check first (a rebinding page gets nothing, CORS answers included); then
    Starlette's CORS, only for a named origin: any other gets no Access-Control-* header."""

    def __init__(self, inner, cors, policy: Policy, told) -> None:
        self.inner, self.cors, self.policy, self.told = inner, cors, policy, told

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        headers = dict(scope["headers"])
        shown = headers.get(b"host", b"").decode("latin-1")
        here = ((scope.get("server") or ("",))[0] or "").lower()  # the address it came in on
        host = host_name(shown)
        if not host or (host not in self.policy.names and host != here):
            why = f"the Host header {shown!r} is not a name of this server"
            self.told(400, scope["method"], scope["path"], why)
            await _drain(receive)  # its body unread, closing would reset the connection
            return await _answer(send, *refusal(scope["path"], 400, why, "invalid_host"))
        origin = headers.get(b"origin", b"").decode("latin-1")
        if self.cors is not None and origin in self.policy.cors_origins:
            return await self.cors(scope, receive, send)
        await self.inner(scope, receive, send)
