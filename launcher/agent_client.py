"""The launcher's side of an agent: signed requests and verified answers, and resumable
verified shard uploads.

The first request is a hello signed for any agent; its signed answer tells the node id and the
boot id that every later request is signed for. An answer that is not signed with the secret
is an impostor's; a signed refusal from a new boot id is the agent restarted: hello again and
send the request once more.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from quantize.checkpoint import sha256_file
from quantize.errors import UserError

from .auth import ANY, BOOT, HELLO, NONCE, AuthError, check_response, sign

MiB = 2**20


@functools.cache
def _tls():
    """httpx's default TLS context, made once: a client builds one otherwise (about 40 ms of
    CPU, reading the CA bundle), and discovery makes a client per address it says hello to."""
    return httpx.create_ssl_context()


KEEPALIVE = 5.0  # seconds an idle connection is reused; the agent keeps one 15 s (guard.py)


class AgentError(UserError):
    """The agent refused a request or could not be reached; the message is the agent's."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class _Restarted(Exception):
    """A signed refusal from a newer start of the agent than the request was signed for."""


class AgentClient:
    """Speaks to the agent at base_url; node_id: the one it must answer as (the id it
    advertised), else whichever its signed hello names."""

    def __init__(
        self, base_url: str, secret: bytes, timeout: float = 30.0, node_id: str | None = None
    ):
        self.base_url = base_url.rstrip("/")
        self.secret = secret
        self.timeout = timeout
        self.expected_node = node_id
        self.node_id: str | None = None  # from the agent's signed hello
        self.boot_id: str | None = None
        self.hello_answer: dict | None = None
        limits = httpx.Limits(
            max_connections=100, max_keepalive_connections=20, keepalive_expiry=KEEPALIVE
        )
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, limits=limits, verify=_tls()
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def hello(self, timeout: float | None = None) -> dict:
        """Asks the agent who it is (signed for any agent) and binds every later request to the
        node id and boot id its signed answer names: {node_id, boot_id, facts, time}."""
        self.node_id = self.boot_id = None
        answer, node, boot = self._send("GET", HELLO, None, b"", {}, timeout, ANY, ANY)
        if not isinstance(answer, dict) or answer.get("node_id") != node:
            raise self._impostor("its hello does not name the node it signed as")
        if answer.get("boot_id") != boot:
            raise self._impostor("its hello does not name the boot id it signed with")
        if self.expected_node is not None and node != self.expected_node:
            raise AgentError(
                f"the agent at {self.base_url} answers as node {node}, not as the "
                f"{self.expected_node} it advertised"
            )
        self.node_id, self.boot_id, self.hello_answer = node, boot, answer
        return answer

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict | None = None,
        body: Any = None,
        content: bytes | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Sends one signed request; returns the agent's verified JSON answer or raises
        AgentError."""
        headers = {}
        if body is not None:
            content = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        content = content or b""
        if self.node_id is None:
            self.hello(timeout)
        limit = self.hello_answer.get("max_body")
        if isinstance(limit, int) and len(content) > limit:
            raise AgentError(
                f"a body of {len(content)} bytes is over the {limit} the agent at "
                f"{self.base_url} accepts",
                413,
            )
        try:
            return self._send(method, path, params, content, headers, timeout)[0]
        except _Restarted:
            self.hello()  # the agent started again since: a refusal, so sending again is safe
            return self._send(method, path, params, content, headers, timeout)[0]

    def _send(self, method, path, params, content, headers, timeout, node=None, boot=None):
        node, boot = node or self.node_id, boot or self.boot_id
        # None would disable every timeout in httpx, not mean the client's: a Mac that hangs or
        # loses its cable must not hang the launcher.
        timeout = self.timeout if timeout is None else timeout
        req = self._http.build_request(
            method, path, params=params, content=content, headers=headers, timeout=timeout
        )
        # Signed over the path and query exactly as they go on the wire.
        raw_path = req.url.raw_path.decode("ascii")
        req.headers.update(sign(self.secret, method, raw_path, content, node=node, boot=boot))
        try:
            r = self._http.send(req)
        except httpx.HTTPError as e:
            raise AgentError(f"cannot reach the agent at {self.base_url}: {e}") from None
        try:
            said_node, said_boot = check_response(
                self.secret, req.headers[NONCE], r.status_code, r.content, r.headers
            )
        except AuthError as e:
            if r.status_code == 503 and r.headers.get(BOOT.lower()) is None:
                # Turned away before the agent's app saw it (its server is at capacity).
                raise AgentError(f"the agent at {self.base_url} is busy (HTTP 503)", 503) from None
            raise self._impostor(e.reason) from None
        if node != ANY and said_node != node:
            raise self._impostor(f"it answered as node {said_node}, not {node}")
        try:
            answer = r.json()
        except ValueError:
            answer = None
        if r.status_code >= 400:
            if node != ANY and said_boot != boot and r.status_code == 401:
                raise _Restarted
            message = answer.get("error") if isinstance(answer, dict) else None
            raise AgentError(message or f"HTTP {r.status_code}: {r.text[:200]}", r.status_code)
        if node != ANY and said_boot != boot:
            raise self._impostor("it answered from another start than the one it was asked for")
        return answer, said_node, said_boot

    def _impostor(self, reason: str) -> AgentError:
        return AgentError(
            f"the agent at {self.base_url} did not prove it knows the cluster secret: {reason} "
            "(an impostor, or this machine's secret is not the cluster's)"
        )

    def facts(self) -> dict:
        return self.request("GET", "/facts")

    def health(self) -> dict:
        return self.request("GET", "/health")

    def models(self) -> list[dict]:
        return self.request("GET", "/models")["models"]

    def start_rank(self, **params) -> dict:
        """Starts a rank: model, split, rank, hostfile, http_host, http_port, name, backend."""
        return self.request("POST", "/ranks", body=params)

    def ranks(self, timeout: float | None = None) -> list[dict]:
        return self.request("GET", "/ranks", timeout=timeout)

    def log(self, run_id: str, tail: int = 200) -> str:
        answer = self.request("GET", f"/ranks/{run_id}/log", params={"tail": tail})
        return "\n".join(answer["lines"])

    def stop(self, run_id: str) -> dict:
        return self.request("POST", f"/ranks/{run_id}/stop", timeout=self.timeout + 10)

    def stop_all(self) -> list[dict]:
        return self.request("POST", "/ranks/stop-all", timeout=self.timeout + 10)["stopped"]

    def fetch_start(
        self,
        repo: str,
        files: list[str],
        revision: str | None = None,
        token: str | None = None,
        verify: bool = False,
    ) -> dict:
        """Has the agent fetch files of a Hugging Face repo into its own cache; token (the
        launcher's HF_TOKEN) goes only in the signed body, and only when there is one; verify:
        hash again the files its cache holds already."""
        body = {"repo": repo, "files": files}
        body |= {"revision": revision} if revision else {}
        body |= {"token": token} if token else {}
        body |= {"verify": True} if verify else {}
        return self.request("POST", "/fetch", body=body)

    def probe_hub(self, repo: str, revision: str | None = None, token: str | None = None) -> dict:
        body = {"repo": repo} | ({"revision": revision} if revision else {})
        return self.request("POST", "/fetch/probe", body=body | ({"token": token} if token else {}))

    def fetch_status(self, fetch_id: str) -> dict:
        return self.request("GET", f"/fetch/{fetch_id}")

    def transfers(self, timeout: float | None = None) -> dict:
        """The agent's recent fetches and uploads: {time, fetches: [...], uploads: [...]}."""
        return self.request("GET", "/transfers", timeout=timeout)

    def file_status(self, rel: str) -> dict:
        return self.request("GET", "/files/status", params={"path": rel})

    def push_file(
        self,
        local: Path,
        rel: str,
        chunk: int = 8 * MiB,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict:
        """Uploads local to models_dir/rel, resuming what the agent already holds, and has the
        agent verify size and sha256 before the file takes its name."""
        local = Path(local)
        size = local.stat().st_size
        status = self.file_status(rel)
        if status["complete"] and status["size"] == size:
            try:
                return self._complete(rel, size, sha256_file(local))
            except AgentError as e:
                if e.status != 400:
                    raise  # a different file of the same size is sent again below
        offset = status["size"] if not status["complete"] and status["size"] <= size else 0
        try:
            return self._upload(local, rel, size, offset, chunk, progress)
        except AgentError as e:
            if offset == 0 or e.status != 400 or "sha256" not in str(e):
                raise
        # The bytes resumed from came from another version of the file: send it all again.
        return self._upload(local, rel, size, 0, chunk, progress)

    def _upload(self, local, rel, size, offset, chunk, progress) -> dict:
        digest = hashlib.sha256()
        with open(local, "rb") as f:
            _hash_prefix(f, digest, offset)
            if size == 0:
                self._chunk(rel, 0, b"")
            while offset < size:
                data = f.read(chunk)
                if not data:
                    raise AgentError(f"{local} shrank while it was being sent")
                self._chunk(rel, offset, data)
                digest.update(data)
                offset += len(data)
                if progress:
                    progress(offset, size)
        return self._complete(rel, size, digest.hexdigest())

    def _chunk(self, rel: str, offset: int, data: bytes) -> None:
        params = {"path": rel, "offset": offset}
        self.request("PUT", "/files/chunk", params=params, content=data)

    def _complete(self, rel: str, size: int, sha256: str) -> dict:
        body = {"path": rel, "size": size, "sha256": sha256}
        # The agent reads the whole file back to hash it: allow for a large shard.
        return self.request("POST", "/files/complete", body=body, timeout=max(self.timeout, 600))


def _hash_prefix(f, digest, length: int) -> None:
    while length > 0:
        block = f.read(min(length, 8 * MiB))
        if not block:
            break
        digest.update(block)
        length -= len(block)
