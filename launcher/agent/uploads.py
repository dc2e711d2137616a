"""Files confined to models_dir: resumable uploads, verified before they count, and the model
and node folders listed."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

from quantize.checkpoint import sha256_file
from quantize.nodes import node_manifest

from .errors import Refused

PARTIAL = ".partial"
KEPT = 50  # upload records kept for the dashboard (the listing shows the newest 20)

_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")


def rel_parts(rel: str) -> list[str]:
    """The components of a safe relative path; Refused(400) for anything else."""
    if not rel or len(rel) > 1024 or "\0" in rel or "\\" in rel or rel.startswith("/"):
        raise Refused(400, f"path {rel!r} must be relative, with '/' between names")
    parts = rel.split("/")
    if len(parts) > 16:
        raise Refused(400, f"path {rel!r} is too deep")
    for part in parts:
        if not _COMPONENT.fullmatch(part) or part.endswith(PARTIAL):
            raise Refused(400, f"path {rel!r}: {part!r} is not an allowed name")
    return parts


def confine(root: Path, rel: str) -> Path:
    """root/rel, refused when any existing part of it is a symlink or it leaves root."""
    path = root.joinpath(*rel_parts(rel))
    try:
        real = path.resolve()
    except (OSError, RuntimeError):
        raise Refused(400, f"path {rel!r} cannot be resolved") from None
    # root is resolved and the parts hold no "..": any difference is a symlink on the way.
    if real != path or not real.is_relative_to(root):
        raise Refused(400, f"path {rel!r} goes through a symlink")
    return path


def _partial(path: Path) -> Path:
    """path's partial file; refused when something other than a regular file holds its name."""
    partial = path.with_name(path.name + PARTIAL)
    if partial.is_symlink() or (partial.exists() and not partial.is_file()):
        raise Refused(400, f"{partial.name} is not a regular file")
    return partial


class Uploads:
    """Resumable uploads: chunks append to REL.partial, which becomes REL once verified."""

    def __init__(self, root: Path):
        self.root = root
        self._locks: dict[Path, threading.Lock] = {}
        self._guard = threading.Lock()
        self._seen: dict[str, dict] = {}  # by path: what a dashboard sees of each upload

    def _note(self, rel: str, fresh: bool = False, **fields) -> None:
        """Keeps what happened to rel's upload: bytes received, then done or failed; fresh: it
        starts again from its first byte."""
        now = time.time()
        with self._guard:
            record = self._seen.pop(rel, None)
            if record is None or fresh or record["state"] != "receiving":
                record = {"path": rel, "received": 0, "size": None, "started": now}
                record |= {"state": "receiving", "error": ""}
            self._seen[rel] = record | fields | {"updated": now}  # the newest last
            while len(self._seen) > KEPT:
                self._seen.pop(next(iter(self._seen)))

    def listing(self, limit: int = 20) -> list[dict]:
        """The limit most recently written uploads, newest first: path (relative to the models
        folder), bytes received, size (known once complete), state (receiving, done, failed)."""
        with self._guard:
            records = list(self._seen.values())
        return [dict(r) for r in reversed(records[-limit:])]

    def _lock(self, path: Path) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(path, threading.Lock())

    def status(self, rel: str) -> dict:
        path = confine(self.root, rel)
        partial = _partial(path)
        if partial.is_file():
            return {"size": partial.stat().st_size, "complete": False}
        if path.is_file():
            return {"size": path.stat().st_size, "complete": True}
        return {"size": 0, "complete": False}

    def write(self, rel: str, offset: int, data: bytes) -> dict:
        path = confine(self.root, rel)
        with self._lock(path):
            if path.is_dir():
                raise Refused(409, f"{rel} is a folder")
            partial = _partial(path)
            current = partial.stat().st_size if partial.exists() else 0
            if offset not in (0, current):  # before any folder is made for a refused chunk
                raise Refused(409, f"offset {offset} is not the {current} bytes held", size=current)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise Refused(409, f"cannot make the folder for {rel}: {e.strerror}") from None
            path = confine(self.root, rel)  # again: the folders now exist
            partial = _partial(path)
            current = partial.stat().st_size if partial.exists() else 0
            if offset not in (0, current):
                raise Refused(409, f"offset {offset} is not the {current} bytes held", size=current)
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if offset == 0 else 0)
            try:
                fd = os.open(partial, flags, 0o644)
            except OSError as e:
                raise Refused(409, f"cannot write {rel}: {e.strerror}") from None
            with os.fdopen(fd, "wb") as f:
                f.seek(offset)
                f.write(data)
            self._note(rel, fresh=offset == 0, received=offset + len(data))
            return {"size": offset + len(data)}

    def complete(self, rel: str, size: int, sha256: str) -> dict:
        """Verifies REL.partial and renames it to REL; with no partial, verifies REL itself.

        A size mismatch keeps the partial (the upload can resume); a sha256 mismatch deletes it,
        since its bytes are wrong and resuming would only append to them."""
        path = confine(self.root, rel)
        partial = _partial(path)
        with self._lock(path):
            if partial.is_file():
                try:
                    _verify(partial, rel, size, sha256, discard=True)
                except Refused as e:
                    if not partial.exists():  # its bytes were wrong and are gone
                        self._note(rel, state="failed", error=e.message)
                    raise
                with open(partial, "rb") as f:
                    os.fsync(f.fileno())
                try:
                    os.replace(partial, path)
                except OSError as e:
                    raise Refused(409, f"cannot finish {rel}: {e.strerror}") from None
                self._note(rel, state="done", size=size, received=size)
                return {"path": rel, "size": size, "sha256": sha256, "already": False}
            if path.is_file():
                _verify(path, rel, size, sha256, discard=False)
                return {"path": rel, "size": size, "sha256": sha256, "already": True}
        raise Refused(404, f"nothing was uploaded to {rel}")


def _verify(path: Path, rel: str, size: int, sha256: str, discard: bool) -> None:
    held = path.stat().st_size
    if held != size:
        raise Refused(400, f"{rel}: size mismatch, {held} bytes held, {size} expected", size=held)
    if sha256_file(path) != sha256:
        if discard:
            path.unlink()
        raise Refused(400, f"{rel}: sha256 mismatch" + (", upload discarded" if discard else ""))


def list_models(root: Path) -> list[dict]:
    """Model folders (with config.json) and node folders (nodes/<r>/manifest.json) in root."""
    models = []
    for folder in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        if not folder.is_dir() or not folder.resolve().is_relative_to(root):
            continue
        nodes = _list_nodes(root, folder)
        config = _read_config(folder / "config.json")
        if config is not None or nodes:
            models.append({"path": folder.name, "config": config, "nodes": nodes})
    return models


def _read_config(path: Path) -> dict | None:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = ("model_type", "num_hidden_layers")
    return {k: config.get(k) for k in keys} if isinstance(config, dict) else None


def _list_nodes(root: Path, folder: Path) -> list[dict]:
    nodes_dir = folder / "nodes"
    if not nodes_dir.is_dir():
        return []
    nodes = []
    for node in sorted(nodes_dir.iterdir()):
        try:
            manifest = node_manifest(node)
            if manifest is None or not node.resolve().is_relative_to(root):
                continue
            files = manifest.get("files", [])
            present = all(
                (node / f["name"]).is_file() and (node / f["name"]).stat().st_size == f["size"]
                for f in files
            )
            nodes.append(
                {
                    "path": node.relative_to(root).as_posix(),
                    "plan": manifest["plan"],
                    "layers": manifest.get("layers"),
                    "complete": present and (node / "config.json").is_file(),
                }
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # a half-written or foreign folder is simply not listed
    return nodes
