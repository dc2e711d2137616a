"""The launcher's side of an agent: signed requests, and resumable verified shard uploads."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from quantize.checkpoint import sha256_file
from quantize.errors import UserError

from .auth import sign

MiB = 2**20


class AgentError(UserError):
    """The agent refused a request or could not be reached; the message is the agent's."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class AgentClient:
    def __init__(self, base_url: str, secret: bytes, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.secret = secret
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
        """Sends one signed request; returns the JSON answer or raises AgentError."""
        headers = {}
        if body is not None:
            content = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        content = content or b""
        req = self._http.build_request(
            method, path, params=params, content=content, headers=headers, timeout=timeout
        )
        # Signed over the path and query exactly as they go on the wire.
        req.headers.update(sign(self.secret, method, req.url.raw_path.decode("ascii"), content))
        try:
            r = self._http.send(req)
        except httpx.HTTPError as e:
            raise AgentError(f"cannot reach the agent at {self.base_url}: {e}") from None
        try:
            answer = r.json()
        except ValueError:
            answer = None
        if r.status_code >= 400:
            message = answer.get("error") if isinstance(answer, dict) else None
            raise AgentError(message or f"HTTP {r.status_code}: {r.text[:200]}", r.status_code)
        return answer

    def facts(self) -> dict:
        return self.request("GET", "/facts")

    def health(self) -> dict:
        return self.request("GET", "/health")

    def models(self) -> list[dict]:
        return self.request("GET", "/models")["models"]

    def start_rank(self, **params) -> dict:
        """Starts a rank: model, split, rank, hostfile, http_host, http_port, name, backend."""
        return self.request("POST", "/ranks", body=params)

    def ranks(self) -> list[dict]:
        return self.request("GET", "/ranks")

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
