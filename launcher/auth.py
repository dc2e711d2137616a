"""HMAC-SHA256 signing between the launcher and the agents, both ways, with replay protection.

A request carries a timestamp, a random nonce, the sha256 of its body (declared in a header,
beside Content-Length), the node id of the agent it is for and that agent's boot id (random
per agent start). The HMAC covers all of them with the method and the path and query, so the
agent checks it from the headers alone, before it reads a byte of the body, then checks the
body against the declared digest. A request for another agent, or for an earlier start of
this one, is refused; only the read-only hello may name any agent ("*"): it is how a launcher
learns an agent's node id and boot id.

Every answer is signed too, over the request's nonce, the status, the sha256 of the answer's
body and the agent's node id and boot id: a process that does not know the secret cannot
answer in an agent's place.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

TIMESTAMP = "X-Mlxdist-Timestamp"
NONCE = "X-Mlxdist-Nonce"
SIGNATURE = "X-Mlxdist-Signature"
CONTENT_SHA256 = "X-Mlxdist-Content-SHA256"
TARGET = "X-Mlxdist-Target"  # the node id the request is for
TARGET_BOOT = "X-Mlxdist-Target-Boot"  # ... and the boot id of the agent it is for
RESPONSE_SIGNATURE = "X-Mlxdist-Response-Signature"
NODE = "X-Mlxdist-Node"  # the answering agent's node id
BOOT = "X-Mlxdist-Boot"  # ... and its boot id
ANY = "*"  # a target for the hello alone
HELLO = "/hello"

_NONCE = re.compile(r"[0-9a-f]{16,64}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}(\.[0-9]{1,6})?")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"\*|[0-9A-Za-z_.-]{1,64}")
_LENGTH = re.compile(r"[0-9]{1,15}")


class AuthError(Exception):
    """A request that is refused; status is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _message(
    method: str, path: str, digest: str, length: int, timestamp: str, nonce: str, node, boot
) -> bytes:
    # The first line keeps a request's MAC from ever standing for an answer's, and back.
    fields = ["mlxdist-request", method.upper(), path, digest, str(length), timestamp, nonce]
    return "\n".join([*fields, node, boot]).encode()


def signature(
    secret: bytes,
    method: str,
    path: str,
    body: bytes,
    timestamp: str,
    nonce: str,
    node: str = ANY,
    boot: str = ANY,
) -> str:
    message = _message(method, path, sha256_hex(body), len(body), timestamp, nonce, node, boot)
    return hmac.new(secret, message, "sha256").hexdigest()


def sign(
    secret: bytes,
    method: str,
    path: str,
    body: bytes,
    *,
    node: str = ANY,
    boot: str = ANY,
    now: float | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Headers that authenticate one request for agent node (boot id boot); path includes the
    query string, as sent. The body goes with Content-Length set to len(body)."""
    return sign_declared(
        secret,
        method,
        path,
        sha256_hex(body),
        len(body),
        node=node,
        boot=boot,
        now=now,
        nonce=nonce,
    )


def sign_declared(
    secret: bytes,
    method: str,
    path: str,
    sha256: str,
    length: int,
    *,
    node: str = ANY,
    boot: str = ANY,
    now: float | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """sign for a body known by its sha256 and length alone (it goes with Content-Length)."""
    timestamp = str(int(time.time() if now is None else now))
    nonce = nonce or secrets.token_hex(16)
    message = _message(method, path, sha256, length, timestamp, nonce, node, boot)
    return {
        TIMESTAMP: timestamp,
        NONCE: nonce,
        CONTENT_SHA256: sha256,
        TARGET: node,
        TARGET_BOOT: boot,
        SIGNATURE: hmac.new(secret, message, "sha256").hexdigest(),
    }


def _response_message(nonce: str, status: int, digest: str, node: str, boot: str) -> bytes:
    return "\n".join(["mlxdist-response", nonce, str(status), digest, node, boot]).encode()


def sign_response(
    secret: bytes, nonce: str, status: int, body: bytes, node: str, boot: str
) -> dict[str, str]:
    """Headers that prove an answer to the request with this nonce comes from a secret holder."""
    mac = hmac.new(secret, _response_message(nonce, status, sha256_hex(body), node, boot), "sha256")
    return {RESPONSE_SIGNATURE: mac.hexdigest(), NODE: node, BOOT: boot}


def check_response(
    secret: bytes, nonce: str, status: int, body: bytes, headers: Mapping[str, str]
) -> tuple[str, str]:
    """(node id, boot id) of a correctly signed answer to the request with this nonce; raises
    AuthError with the reason otherwise."""
    sig, node, boot = (_header(headers, h) for h in (RESPONSE_SIGNATURE, NODE, BOOT))
    if sig is None or node is None or boot is None:
        raise AuthError(401, "the answer is not signed")
    if not _SIGNATURE.fullmatch(sig) or not _ID.fullmatch(node) or not _ID.fullmatch(boot):
        raise AuthError(401, "the answer's signature headers are malformed")
    expected = sign_response(secret, nonce, status, body, node, boot)[RESPONSE_SIGNATURE]
    if not hmac.compare_digest(expected, sig):
        raise AuthError(401, "the answer's signature is wrong")
    return node, boot


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    return value if value is not None else headers.get(name.lower())


@dataclass(frozen=True)
class Declared:
    """What a request's verified headers promise its body is."""

    sha256: str
    length: int


class Verifier:
    """Checks signed requests for the agent node_id in its start boot_id; remembers each nonce
    until its timestamp has gone stale."""

    def __init__(
        self,
        secret: bytes,
        window: float = 30.0,
        max_nonces: int = 100_000,
        *,
        node_id: str,
        boot_id: str,
    ):
        if len(secret) < 16:
            raise ValueError("the secret must be at least 16 bytes")
        self._secret = secret
        self.window = window
        self.max_nonces = max_nonces
        self.node_id = node_id
        self.boot_id = boot_id
        self._seen: dict[str, float] = {}
        self._expiry: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def check_headers(
        self, method: str, path: str, headers: Mapping[str, str], now: float | None = None
    ) -> Declared:
        """Everything but the body: the headers present, well formed, fresh, signed with the
        secret, for this agent and this start of it, and new. Returns the body they declare."""
        names = (TIMESTAMP, NONCE, SIGNATURE, CONTENT_SHA256, TARGET, TARGET_BOOT)
        timestamp, nonce, sig, digest, node, boot = (_header(headers, h) for h in names)
        if None in (timestamp, nonce, sig, digest, node, boot):
            raise AuthError(401, "missing signature headers")
        if not _TIMESTAMP.fullmatch(timestamp) or not _NONCE.fullmatch(nonce):
            raise AuthError(401, "malformed signature headers")
        if not _SIGNATURE.fullmatch(digest) or not _ID.fullmatch(node) or not _ID.fullmatch(boot):
            raise AuthError(401, "malformed signature headers")
        if not _SIGNATURE.fullmatch(sig):
            raise AuthError(401, "bad signature")
        if _header(headers, "transfer-encoding") is not None:
            raise AuthError(411, "a signed request declares its length (no chunked bodies)")
        length = _header(headers, "content-length") or "0"
        if not _LENGTH.fullmatch(length):
            raise AuthError(400, "malformed Content-Length")
        now = time.time() if now is None else now
        if abs(now - float(timestamp)) > self.window:
            raise AuthError(401, "stale")
        message = _message(method, path, digest, int(length), timestamp, nonce, node, boot)
        expected = hmac.new(self._secret, message, "sha256").hexdigest()
        if not hmac.compare_digest(expected, sig):
            raise AuthError(401, "bad signature")
        hello = method.upper() == "GET" and path == HELLO
        if node != self.node_id and not (hello and node == ANY):
            raise AuthError(401, "signed for another agent")
        if boot != self.boot_id and not (hello and boot == ANY):
            raise AuthError(401, "signed for an earlier start of this agent: say hello again")
        self._remember(nonce, float(timestamp) + self.window, now)
        return Declared(digest, int(length))

    def verify(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        now: float | None = None,
    ) -> None:
        """Raises AuthError unless the request and its whole body are signed, fresh and new."""
        headers = {k.lower(): v for k, v in headers.items()}
        headers.setdefault("content-length", str(len(body)))
        declared = self.check_headers(method, path, headers, now)
        check_body(declared, body)

    def _remember(self, nonce: str, expires: float, now: float) -> None:
        with self._lock:
            while self._expiry and self._expiry[0][0] < now:
                _, old = heapq.heappop(self._expiry)
                self._seen.pop(old, None)
            if nonce in self._seen:
                raise AuthError(401, "replayed")
            if len(self._seen) >= self.max_nonces:
                raise AuthError(429, "too many requests")
            self._seen[nonce] = expires
            heapq.heappush(self._expiry, (expires, nonce))


def check_body(declared: Declared, body: bytes) -> None:
    if len(body) != declared.length or not hmac.compare_digest(sha256_hex(body), declared.sha256):
        raise AuthError(400, "the body is not the one the signature declares")
