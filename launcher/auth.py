"""HMAC-SHA256 request signing between the launcher and the agents, with replay protection.

A request carries a timestamp, a random nonce and an HMAC over the method, the path with its
query string, the sha256 of the body, the timestamp and the nonce. The agent accepts it once,
and only within `window` seconds of its own clock.
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

TIMESTAMP = "X-Mlxdist-Timestamp"
NONCE = "X-Mlxdist-Nonce"
SIGNATURE = "X-Mlxdist-Signature"

_NONCE = re.compile(r"[0-9a-f]{16,64}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}(\.[0-9]{1,6})?")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")


class AuthError(Exception):
    """A request that is refused; status is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _message(method: str, path: str, body: bytes, timestamp: str, nonce: str) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return f"{method.upper()}\n{path}\n{digest}\n{timestamp}\n{nonce}".encode()


def signature(
    secret: bytes, method: str, path: str, body: bytes, timestamp: str, nonce: str
) -> str:
    return hmac.new(secret, _message(method, path, body, timestamp, nonce), "sha256").hexdigest()


def sign(
    secret: bytes,
    method: str,
    path: str,
    body: bytes,
    *,
    now: float | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Headers that authenticate one request; path includes the query string, as sent."""
    timestamp = str(int(time.time() if now is None else now))
    nonce = nonce or secrets.token_hex(16)
    return {
        TIMESTAMP: timestamp,
        NONCE: nonce,
        SIGNATURE: signature(secret, method, path, body, timestamp, nonce),
    }


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    return value if value is not None else headers.get(name.lower())


class Verifier:
    """Checks signed requests; remembers each nonce until its timestamp has gone stale."""

    def __init__(self, secret: bytes, window: float = 30.0, max_nonces: int = 100_000):
        if len(secret) < 16:
            raise ValueError("the secret must be at least 16 bytes")
        self._secret = secret
        self.window = window
        self.max_nonces = max_nonces
        self._seen: dict[str, float] = {}
        self._expiry: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def check_headers(self, headers: Mapping[str, str], now: float | None = None) -> None:
        """The checks that need no body: headers present, well formed, and fresh."""
        timestamp = _header(headers, TIMESTAMP)
        nonce = _header(headers, NONCE)
        sig = _header(headers, SIGNATURE)
        if timestamp is None or nonce is None or sig is None:
            raise AuthError(401, "missing signature headers")
        if not _TIMESTAMP.fullmatch(timestamp) or not _NONCE.fullmatch(nonce):
            raise AuthError(401, "malformed signature headers")
        if not _SIGNATURE.fullmatch(sig):
            raise AuthError(401, "bad signature")
        now = time.time() if now is None else now
        if abs(now - float(timestamp)) > self.window:
            raise AuthError(401, "stale")

    def verify(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        now: float | None = None,
    ) -> None:
        """Raises AuthError unless the request is signed with the secret, fresh and new."""
        now = time.time() if now is None else now
        self.check_headers(headers, now)
        timestamp = _header(headers, TIMESTAMP)
        nonce = _header(headers, NONCE)
        expected = signature(self._secret, method, path, body, timestamp, nonce)
        if not hmac.compare_digest(expected, _header(headers, SIGNATURE)):
            raise AuthError(401, "bad signature")
        self._remember(nonce, float(timestamp) + self.window, now)

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
