"""A Hugging Face Hub without network, for tests of anything that resolves a repo id.

Two stand-ins, both speaking to real huggingface_hub code: a Hugging Face cache written on disk
in the layout huggingface_hub itself writes (write_hf_cache), and a loopback HTTP server that
answers the Hub endpoints snapshot_download, hf_hub_download and get_safetensors_metadata call
(FakeHub: repo info, tree listing, resolve with HEAD, GET and byte ranges). tests/test_source.py
checks that the two give identical caches.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

REPO = "org/tiny-r1"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --- the Hub's file identities and cache layout ----------------------------------------------


def is_lfs(name: str) -> bool:
    return name.endswith((".safetensors", ".bin"))


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
    )


def etag(name: str, data: bytes) -> str:
    # The Hub's ETag, which names the blob: sha256 of the content for LFS files, git blob id else.
    return hashlib.sha256(data).hexdigest() if is_lfs(name) else git_blob_id(data)


def tree_entry(name: str, data: bytes) -> dict:
    """One file of the Hub's /tree listing."""
    if not is_lfs(name):
        return {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
    lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
    oid = git_blob_id(lfs_pointer(data))
    return {"type": "file", "path": name, "size": len(data), "oid": oid, "lfs": lfs}


def write_hf_cache(
    cache: Path,
    files: dict[str, bytes],
    *,
    repo_id: str = REPO,
    commit: str = COMMIT,
    cached: set[str] | None = None,
    tree: bool = False,
    refs: tuple[str, ...] = ("main",),
) -> Path:
    """A Hugging Face cache holding repo_id at commit under each of refs; returns the snapshot.

    cached: the files present (default all); tree: also the tree listing that
    huggingface_hub >= 2 saves after an online snapshot_download.
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        if cached is not None and name not in cached:
            continue
        blob = repo / "blobs" / etag(name, data)
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        # No trailing newline: snapshot_download reads the commit hash from refs/ without stripping.
        (repo / "refs" / ref).write_text(commit)
    if tree:
        listing = {name: _tree_cache_entry(name, data) for name, data in sorted(files.items())}
        (repo / "trees").mkdir()
        data = {"format_version": 1, "files": listing}
        (repo / "trees" / f"{commit}.json").write_text(json.dumps(data, indent=1))
    return snapshot


def _tree_cache_entry(name: str, data: bytes) -> dict:
    entry = tree_entry(name, data)
    info = {"size": entry["size"], "blob_id": entry["oid"]}
    if "lfs" in entry:
        info |= {"lfs_sha256": entry["lfs"]["oid"], "lfs_size": entry["lfs"]["size"]}
    return info


def cache_layout(cache: Path) -> dict[str, str]:
    """Every path under the cache's repo folders: symlink target, file text or blob marker."""
    layout = {}
    for path in sorted(cache.glob("models--*/**/*")):
        rel = path.relative_to(cache).as_posix()
        if path.is_symlink():
            layout[rel] = "-> " + os.readlink(path)
        elif path.is_file() and "/blobs/" in rel:
            layout[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_file():
            layout[rel] = path.read_text()
    return layout


def cached_files(cache: Path, repo_id: str = REPO) -> set[str]:
    """The file names present in any snapshot of repo_id in the cache."""
    snapshots = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return {p.relative_to(s).as_posix() for s in snapshots.glob("*") for p in s.rglob("*")}


def model_files(folder: Path) -> dict[str, bytes]:
    """A model folder's files by name, as a repo holding them would serve them."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --- a loopback Hub ------------------------------------------------------------------------


class FakeHub:
    """Answers repo info, tree listing and resolve (HEAD, GET, Range) like huggingface.co does.

    Every repo's branches and tags (`revisions`) name `commit` (COMMIT until a test moves it,
    as a push to the branch would); a commit hash the hub has named stays known, serving the
    same files. `tree_override` replaces fields of a file's /tree entry (a broken or hostile
    server's listing).
    """

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.gated: set[str] = set()
        self.revisions: set[str] = {"main"}
        self.commit = COMMIT
        self.commits: set[str] = {COMMIT}
        self.tree_override: dict[str, dict] = {}
        self.requests: list[str] = []
        self.downloads: list[tuple[str, str]] = []  # whole files sent
        self.ranges: list[tuple[str, str, str]] = []  # (repo, file, "bytes=a-b") sent
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def fetched(self, repo_id: str = REPO) -> set[str]:
        return {name for repo, name in self.downloads if repo == repo_id}

    def knows(self, revision: str) -> bool:
        return revision in self.commits or revision == self.commit or revision in self.revisions

    def sha(self, revision: str) -> str:
        """The commit revision names now."""
        self.commits.add(self.commit)
        return revision if revision in self.commits else self.commit


@contextmanager
def running_hub(repos: dict[str, dict[str, bytes]]) -> Iterator[FakeHub]:
    """A FakeHub serving repos on a loopback port while the block runs."""
    hub = FakeHub()
    hub.repos.update(repos)
    thread = threading.Thread(target=hub.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.server.shutdown()
        hub.server.server_close()


_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self._route(body=False)

        def do_GET(self) -> None:
            self._route(body=True)

        def _route(self, body: bool) -> None:
            hub.requests.append(f"{self.command} {self.path}")
            # Split before unquoting: a revision such as refs/pr/1 arrives as one quoted segment.
            parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
            if parts[:2] == ["api", "models"]:
                parts = parts[2:]
                if len(parts) == 2:  # model info at the default branch
                    parts += ["revision", "main"]
            if len(parts) < 3:  # e.g. what newer huggingface_hub asks on the side
                return self._error(404, "NotFound")
            repo_id, kind = "/".join(parts[:2]), parts[2]
            if repo_id not in hub.repos:
                return self._error(404, "RepoNotFound")
            files = hub.repos[repo_id]
            revision = parts[3] if len(parts) > 3 else "main"
            if not hub.knows(revision):
                return self._error(404, "RevisionNotFound")
            if kind == "revision":
                siblings = [{"rfilename": name} for name in files]
                return self._json({"id": repo_id, "sha": hub.sha(revision), "siblings": siblings})
            if kind == "tree":
                over = hub.tree_override
                listing = [tree_entry(n, d) | over.get(n, {}) for n, d in files.items()]
                return self._json(listing)
            if repo_id in hub.gated:
                return self._error(403, "GatedRepo")
            name = "/".join(parts[4:])
            if name not in files:
                return self._error(404, "EntryNotFound")
            commit = hub.sha(revision)
            headers = {"X-Repo-Commit": commit, "ETag": f'"{etag(name, files[name])}"'}
            whole = files[name]
            data, status = whole, 200
            wanted = _RANGE.match(self.headers.get("Range", ""))
            if wanted and body:
                first, last = int(wanted[1]), int(wanted[2] or len(whole) - 1)
                data, status = whole[first : last + 1], 206
                headers["Content-Range"] = f"bytes {first}-{first + len(data) - 1}/{len(whole)}"
                hub.ranges.append((repo_id, name, self.headers["Range"]))
            elif body:
                hub.downloads.append((repo_id, name))
            self._send(data, headers, body, status)

        def _json(self, obj: object) -> None:
            self._send(json.dumps(obj).encode(), {"Content-Type": "application/json"}, True)

        def _error(self, status: int, code: str) -> None:
            body = json.dumps({"error": code}).encode()
            self._send(body, {"X-Error-Code": code}, self.command == "GET", status)

        def _send(self, data: bytes, headers: dict, body: bool, status: int = 200) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler
