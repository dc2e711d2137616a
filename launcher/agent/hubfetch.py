"""An agent fetching its own files of a Hugging Face repo into its own Hugging Face cache.

Files land as huggingface_hub lays them out (blobs/<etag>, snapshots/<commit>/<name>, refs/),
so every Hugging Face tool on the host finds them. A download resumes from its
blobs/<etag>.incomplete with a byte range; each file is hashed as it arrives and checked against
the size and hash the Hub's tree listing gives (sha256 for LFS files, the git blob id else)
before it counts, and a file that differs is deleted and named. An LFS blob already in the cache
is named by its sha256, checked when it was written: it is trusted when its size matches, and
hashed again only when the launcher asks to verify (a model of hundreds of GB is not re-read on
every launch). The commit and etags the Hub gives become path names, so they must be hex. The
rank's folder is models/hub/<org>--<name>--<commit>, whose entries link to the snapshot. A
token, when given, lives only in this process's memory and is cut out of every error.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.utils import build_hf_headers, get_session

from quantize.checkpoint import human_bytes

from ..diskfree import free_bytes
from .errors import Refused
from .requests import FetchFiles

HUB_FOLDER = "hub"  # under the models folder
_CHUNK = 1 << 20
DOWNLOAD_TIMEOUT = 60.0  # seconds without a byte before a download fails (resumable)
COMMIT = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")


class FetchFailed(Exception):
    """A fetch that cannot go on; the message names the file and what to do."""


@dataclass(frozen=True)
class HubFile:
    name: str
    size: int
    etag: str  # the blob's name in the cache: sha256 for LFS files, the git blob id else
    lfs: bool


@dataclass
class Fetch:
    id: str
    repo: str
    revision: str
    files: list[str]
    verify: bool = False  # hash again the LFS blobs already in the cache
    state: str = "starting"  # starting, running, done, failed
    error: str = ""
    commit: str = ""
    folder: str = ""  # relative to the models folder, once done
    sizes: dict[str, int] = field(default_factory=dict)
    done: dict[str, int] = field(default_factory=dict)
    received: int = 0  # bytes that came over the network in this fetch
    rehashed: int = 0  # bytes read back from disk to hash them (not those hashed on arrival)
    current: str = ""  # the file being written, and where
    partial: Path | None = None
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)  # the last byte or change of state

    def info(self) -> dict:
        done = dict(self.done)
        partial = self.partial
        if partial is not None:
            done[self.current] = _size(partial)
        return {
            "id": self.id,
            "repo": self.repo,
            "revision": self.revision,
            "commit": self.commit,
            "state": self.state,
            "error": self.error,
            "folder": self.folder,
            "total": sum(self.sizes.values()),
            "done": sum(done.values()),
            "received": self.received,
            "rehashed": self.rehashed,
            "files": {n: {"size": s, "done": done.get(n, 0)} for n, s in self.sizes.items()},
        }


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hasher(size: int, lfs: bool):
    """What the Hub's listing names a file by, fed block by block: sha256 (LFS), or the git
    blob id of a file of this size (sha1 over a header, then the bytes)."""
    return hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % size)


def hash_file(h, path: Path) -> int:
    """Feeds path's bytes to h; returns how many were read."""
    n = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
            n += len(block)
    return n


def file_digest(path: Path, lfs: bool) -> str:
    h = hasher(_size(path), lfs)
    hash_file(h, path)
    return h.hexdigest()


def check_revision(revision: str) -> str:
    """A branch, tag or commit, with '/' as the Hub allows (refs/pr/1): it becomes a path under
    refs/ as huggingface_hub writes it, so no empty, '.' or '..' part and no leading '/'."""
    parts = revision.split("/")
    if any(p in ("", ".", "..") for p in parts) or ".." in revision or "\\" in revision:
        raise FetchFailed(f"{revision!r} is not a branch, tag or commit")
    return revision


def repo_cache(cache: Path, repo: str) -> Path:
    return cache / f"models--{repo.replace('/', '--')}"


class Fetches:
    """The agent's fetches: each runs in its own thread; info() answers the launcher's polls."""

    def __init__(self, models_root: Path, cache: Path | None = None):
        self.root = models_root
        self.cache = Path(cache or constants.HF_HUB_CACHE)
        self._fetches: dict[str, Fetch] = {}
        self._lock = threading.Lock()
        # One download at a time: two fetches of a file would append to one .incomplete.
        self._downloading = threading.Lock()

    def start(self, req: FetchFiles) -> dict:
        revision = req.revision or "main"
        fetch = Fetch(secrets.token_hex(8), req.repo, revision, list(req.files), req.verify)
        with self._lock:
            self._fetches[fetch.id] = fetch
        token = req.token  # kept by the thread only, never in the fetch's record
        threading.Thread(target=self._run, args=(fetch, token), daemon=True).start()
        return fetch.info()

    def get(self, fetch_id: str) -> dict:
        with self._lock:
            fetch = self._fetches.get(fetch_id)
        if fetch is None:
            raise Refused(404, f"no fetch {fetch_id!r}")
        return fetch.info()

    def listing(self, limit: int = 20) -> list[dict]:
        """The limit most recently started fetches, newest first, for a dashboard: no file
        list, and never the token (no record holds it)."""
        with self._lock:
            fetches = sorted(self._fetches.values(), key=lambda f: f.started, reverse=True)
        rows = []
        for fetch in fetches[:limit]:
            info = fetch.info()
            keys = ("id", "repo", "revision", "state", "done", "total", "error")
            rows.append(
                {k: info[k] for k in keys} | {"started": fetch.started, "updated": fetch.updated}
            )
        return rows

    def _run(self, fetch: Fetch, token: str | None) -> None:
        try:
            check_revision(fetch.revision)
            hub = _listing(fetch, token)
            fetch.state, fetch.updated = "running", time.time()
            repo = repo_cache(self.cache, fetch.repo)
            _check_room(fetch, repo, hub, self.cache)
            with self._downloading:
                for name in fetch.files:
                    fetch.done[name] = self._one(fetch, repo, hub[name], token)
                    fetch.updated = time.time()
            _write_ref(repo, fetch.revision, fetch.commit)
            fetch.folder = self._link(fetch, repo)
            fetch.state = "done"
        except FetchFailed as e:
            fetch.error, fetch.state = scrub(str(e), token), "failed"
        except Exception as e:  # network and Hub errors: named without what was sent
            why = f"fetching {fetch.repo} failed: {type(e).__name__}: {_first_line(e)}"
            fetch.error, fetch.state = scrub(why, token), "failed"
        finally:
            fetch.partial = None
            fetch.updated = time.time()

    def _one(self, fetch: Fetch, repo: Path, f: HubFile, token: str | None) -> int:
        """One file into the cache, resumed when part of it is there; returns its size."""
        blob = repo / "blobs" / f.etag
        link = repo / "snapshots" / fetch.commit / f.name
        if blob.is_file():
            # An LFS blob's name is its sha256, checked when it was written: trusted at its size.
            trusted = f.lfs and not fetch.verify and _size(blob) == f.size
            good = trusted or (_size(blob) == f.size and self._rehash(fetch, blob, f) == f.etag)
        else:
            partial = blob.with_name(f.etag + ".incomplete")
            partial.parent.mkdir(parents=True, exist_ok=True)
            fetch.current, fetch.partial = f.name, partial
            digest = self._download(fetch, f, partial, token)
            fetch.partial = None
            good = _size(partial) == f.size and digest == f.etag
            if good:
                os.replace(partial, blob)
            else:
                partial.unlink(missing_ok=True)
        if not good:
            blob.unlink(missing_ok=True)
            link.unlink(missing_ok=True)
            kind = "sha256" if f.lfs else "git blob id"
            raise FetchFailed(
                f"{f.name} of {fetch.repo} differs from the Hub's size or {kind}: refused and "
                "deleted; fetch again, and if it differs again the repo or the network is at fault"
            )
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
        return f.size

    @staticmethod
    def _rehash(fetch: Fetch, path: Path, f: HubFile) -> str:
        h = hasher(f.size, f.lfs)
        fetch.rehashed += hash_file(h, path)
        return h.hexdigest()

    def _download(self, fetch: Fetch, f: HubFile, partial: Path, token: str | None) -> str:
        """The rest of f into partial; returns the digest of the whole (a resumed file's first
        part read back once, the rest hashed as it arrives)."""
        h = hasher(f.size, f.lfs)
        have = _size(partial)
        if have >= f.size:
            fetch.rehashed += hash_file(h, partial)
            return h.hexdigest()
        url = hf_hub_url(fetch.repo, f.name, revision=fetch.commit)
        headers = build_hf_headers(token=token) | {"Range": f"bytes={have}-"}
        stream = get_session().stream(
            "GET", url, headers=headers, follow_redirects=True, timeout=DOWNLOAD_TIMEOUT
        )
        with stream as r:
            if r.status_code == 200:
                have = 0  # the server sent the whole file: start again
            elif r.status_code != 206:
                raise FetchFailed(f"{f.name} of {fetch.repo}: the Hub answered {r.status_code}")
            with open(partial, "r+b" if have else "wb") as out:
                out.truncate(have)
                if have:
                    fetch.rehashed += hash_file(h, partial)
                out.seek(have)
                for block in r.iter_bytes(_CHUNK):
                    have += len(block)
                    if have > f.size:  # never more than the Hub said: the disk check holds
                        raise FetchFailed(
                            f"{f.name} of {fetch.repo}: the Hub sent more than its "
                            f"{f.size} bytes; fetch again"
                        )
                    out.write(block)
                    h.update(block)
                    fetch.received += len(block)
                    fetch.updated = time.time()
        return h.hexdigest()

    def _link(self, fetch: Fetch, repo: Path) -> str:
        """models/hub/<org>--<name>--<commit>/<file> -> the snapshot's file."""
        rel = f"{HUB_FOLDER}/{fetch.repo.replace('/', '--')}--{fetch.commit}"
        folder = self.root / rel
        folder.mkdir(parents=True, exist_ok=True)
        for name in fetch.files:
            target = repo / "snapshots" / fetch.commit / name
            entry = folder / name
            if entry.is_symlink() or entry.exists():
                entry.unlink()
            entry.symlink_to(target)
        return rel


def probe(repo: str, revision: str | None, token: str | None, timeout: float = 5.0) -> dict:
    """Whether this host reaches the Hub and sees repo at revision: one small request."""
    try:
        api = HfApi(token=token)
        info = api.model_info(repo, revision=revision or "main", timeout=timeout)
    except Exception as e:  # unreachable, refused, gated, missing: each a reason to push
        return {"ok": False, "why": scrub(f"{type(e).__name__}: {_first_line(e)}", token)}
    return {"ok": True, "why": "", "commit": info.sha or ""}


def _listing(fetch: Fetch, token: str | None) -> dict[str, HubFile]:
    """The commit the revision names, and the size and hash of each file asked for."""
    api = HfApi(token=token)
    commit = api.model_info(fetch.repo, revision=fetch.revision).sha or ""
    if not COMMIT.fullmatch(commit):  # it names a folder: never '../..' from a broken server
        raise FetchFailed(
            f"the Hub gave {fetch.repo}@{fetch.revision} a commit that is not 40 hex digits: "
            "refused (is HF_ENDPOINT the Hub?)"
        )
    fetch.commit = commit
    hub = {}
    for entry in api.list_repo_tree(fetch.repo, revision=fetch.commit, recursive=True):
        size = getattr(entry, "size", None)
        if size is None:
            continue  # a folder
        lfs = entry.lfs is not None
        hub[entry.path] = HubFile(entry.path, size, entry.lfs.sha256 if lfs else entry.blob_id, lfs)
    bad = [n for n in fetch.files if n in hub and not _etag_ok(hub[n])]
    if bad:  # the etag names the blob's file
        raise FetchFailed(
            f"the Hub listed {bad[0]} of {fetch.repo}@{fetch.revision} with a hash that is not "
            "a sha256 or git blob id: refused (is HF_ENDPOINT the Hub?)"
        )
    missing = [n for n in fetch.files if n not in hub]
    if missing:
        raise FetchFailed(
            f"{fetch.repo}@{fetch.revision} has no {', '.join(missing[:3])}: "
            "is this the right repo and revision?"
        )
    fetch.sizes = {n: hub[n].size for n in fetch.files}
    return hub


def _check_room(fetch: Fetch, repo: Path, hub: dict[str, HubFile], cache: Path) -> None:
    """Refuses, before a byte comes, a share that does not fit the cache's free disk (counting
    what is already there: whole files and partial ones)."""
    need = 0
    for name in fetch.files:
        blob = repo / "blobs" / hub[name].etag
        if not blob.is_file():
            need += hub[name].size - _size(blob.with_name(blob.name + ".incomplete"))
    free = free_bytes(cache)
    if need > free:
        raise FetchFailed(
            f"needs {human_bytes(need)} ({need} bytes) for its files of {fetch.repo} but has "
            f"{human_bytes(free)} ({free} bytes) free in its Hugging Face cache {cache}: free "
            "disk space there, or give this node fewer layers"
        )


def _etag_ok(f: HubFile) -> bool:
    return bool((SHA256 if f.lfs else COMMIT).fullmatch(f.etag))


def _write_ref(repo: Path, revision: str, commit: str) -> None:
    """refs/<revision> holds the commit, a revision with '/' in subfolders (refs/pr/1 at
    refs/refs/pr/1), as huggingface_hub writes it."""
    if revision != commit:
        ref = repo / "refs" / check_revision(revision)
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)  # no newline, as huggingface_hub writes it


def scrub(text: str, token: str | None) -> str:
    """text without the token, should a server have echoed it back into an error."""
    return text.replace(token, "<token>") if token else text


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]
