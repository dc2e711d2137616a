"""Resolve the model a command is given to a local model folder or .gguf file.

A model is a local folder, a .gguf file or a Hugging Face repo id, `org/name` or
`org/name@revision` (a branch, tag or commit). A repo is fetched with
`huggingface_hub.snapshot_download` into the user's own cache, so resuming, HF_HOME /
HF_HUB_CACHE and HF_HUB_OFFLINE=1 behave exactly as in every other Hugging Face tool.
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .errors import UserError

try:  # huggingface_hub 2.x talks HTTP through httpx2, 1.x through httpx
    import httpx2 as _http
except ImportError:  # pragma: no cover
    import httpx as _http

# Everything a model folder needs to be converted, and nothing else (no .bin, .pth, onnx, ...).
DEFAULT_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",  # Kimi K2's vocabulary
    "chat_template.jinja",
    "model.safetensors.index.json",
    "*.safetensors",
]

# What a plan reads of a repo: the sizes come from the index (and the safetensors headers).
INDEX_PATTERNS = ["config.json", "model.safetensors.index.json"]

_NETWORK_ERRORS = (_http.TransportError, ConnectionError, TimeoutError)
_COMMIT = re.compile(r"[0-9a-f]{40}")


class SourceError(UserError):
    """A SRC that cannot be used; the one-line message says what to do."""


@dataclass(frozen=True)
class ModelRef:
    """A model as the user named it and where it is on this machine: repo and revision for a
    Hugging Face repo (None for a local path), local_path the folder or file to read (for a
    repo, its snapshot in the Hugging Face cache, holding the files fetched so far); verify,
    how its files already on the nodes are checked."""

    repo: str | None
    revision: str | None
    local_path: Path
    verify: bool = False  # nodes hash again the files their caches hold already (--verify)

    @property
    def label(self) -> str:
        return _label(self.repo, self.revision) if self.repo else str(self.local_path)


def parse_repo_spec(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision) for `org/name` or `org/name@revision`; None when spec does not look
    like a repo id (a path, a bare name). A spec with an @ that is no valid repo id is refused."""
    repo, at, revision = spec.partition("@")
    if not at:
        try:
            validate_repo_id(spec)
        except HFValidationError:
            return None
        # A bare name ("gpt2") is a valid repo id too, but here it is far more likely a path.
        return (spec, None) if spec.count("/") == 1 else None
    why = None
    if repo.count("/") != 1:
        why = "a repo id is org/name"
    elif not revision or revision != revision.strip() or any(c.isspace() for c in revision):
        why = "the revision after @ is empty or holds spaces"
    else:
        try:
            validate_repo_id(repo)
        except HFValidationError:
            why = "org and name take letters, digits, '-', '_' and '.'"
    if why is not None:
        raise SourceError(
            f"{spec} is not a Hugging Face repo id ({why}): give org/name or org/name@revision "
            "(a branch, tag or commit)"
        )
    return repo, revision


def resolve_ref(spec: str, *, allow_patterns: list[str] | None = None) -> ModelRef:
    """spec as a ModelRef: a local folder or .gguf file as is, a Hugging Face repo id (with its
    @revision) fetched into the user's cache, the files matching allow_patterns (default: all a
    model needs to run or be converted)."""
    local = _local(spec)
    if local is not None:
        if local.is_dir() and not (local / "config.json").is_file():
            raise SourceError(f"{local} has no config.json: is it a model folder?")
        return ModelRef(None, None, local)
    repo_id, revision = _repo_id(spec)
    patterns = list(allow_patterns) if allow_patterns is not None else DEFAULT_PATTERNS
    folder = _download(repo_id, revision, patterns)
    _check_complete(folder, _label(repo_id, revision), patterns)
    return ModelRef(repo_id, revision, folder)


def resolve_source(
    spec: str, *, allow_patterns: list[str] | None = None, revision: str | None = None
) -> Path:
    """A local model folder or .gguf file for spec, fetching a Hugging Face repo if needed."""
    if revision is not None:
        spec = _with_revision(spec, revision)
    return resolve_ref(spec, allow_patterns=allow_patterns).local_path


def pinned(ref: ModelRef) -> ModelRef:
    """ref at the commit of the snapshot this machine read (the one a plan is made from), so
    every node fetches that very commit even if the branch moves meanwhile."""
    found = repo_of_snapshot(ref.local_path) if ref.repo else None
    if found is None or not _COMMIT.fullmatch(found[1]):
        return ref
    return replace(ref, revision=found[1])


def index_only(spec: str) -> ModelRef:
    """spec with, for a Hugging Face repo, only config.json and the safetensors index fetched
    (no weights): all a plan reads. A local path is as resolve_ref gives it."""
    return resolve_ref(spec, allow_patterns=INDEX_PATTERNS)


def config_only(spec: str, *, revision: str | None = None) -> Path:
    """The config.json of spec, fetching only that file from a Hugging Face repo.

    A .gguf file is returned as is: its configuration lives in its own header.
    """
    local = _local(spec, allow_json=True)
    if local is not None:
        if local.is_file():
            return local
        config = local / "config.json"
        if not config.is_file():
            raise SourceError(f"{local} has no config.json: is it a model folder?")
        return config
    if revision is not None:
        spec = _with_revision(spec, revision)
    repo_id, revision = _repo_id(spec)
    folder = _download(repo_id, revision, ["config.json"])
    _check_complete(folder, _label(repo_id, revision), ["config.json"])
    return folder / "config.json"


def repo_of_snapshot(path: Path) -> tuple[str, str] | None:
    """(repo id, commit) of a folder or file inside a Hugging Face cache snapshot
    (.../models--org--name/snapshots/COMMIT/...), None for any other path."""
    parts = Path(path).parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            org, _, name = parts[i][len("models--") :].partition("--")
            return (f"{org}/{name}", parts[i + 2]) if name else None
    return None


def snapshot_headers(path: Path) -> dict[str, dict] | None:
    """The safetensors headers of the repo whose Hugging Face cache snapshot `path` is, for a
    repo planned from its index alone: fetched by byte ranges once per process (a snapshot is
    a commit, which never changes). None outside the cache, offline, or when the Hub cannot
    tell (the caller then estimates and says so)."""
    found = repo_of_snapshot(path)
    if found is None or constants.HF_HUB_OFFLINE:
        return None
    try:
        return _headers_at(*found)
    except SourceError:
        return None


@functools.lru_cache(maxsize=8)
def _headers_at(repo_id: str, commit: str) -> dict[str, dict]:
    return safetensors_headers(repo_id, commit)


def safetensors_headers(repo_id: str, revision: str) -> dict[str, dict]:
    """Each safetensors file's header of a Hugging Face repo, {file: {tensor: {dtype, shape,
    data_offsets}}}, fetched with byte-range requests (huggingface_hub's
    get_safetensors_metadata): the headers only, never the weights."""
    from huggingface_hub import get_safetensors_metadata

    label = _label(repo_id, revision)
    try:
        meta = get_safetensors_metadata(repo_id, revision=revision)
    except Exception as err:
        mapped = _hub_error(repo_id, revision, err)
        why = f"cannot read the safetensors headers of {label}: {_one_line(err)}"
        raise mapped or SourceError(why) from err
    return {
        file: {
            name: {"dtype": t.dtype, "shape": t.shape, "data_offsets": list(t.data_offsets)}
            for name, t in fm.tensors.items()
        }
        for file, fm in meta.files_metadata.items()
    }


def _local(spec: str, allow_json: bool = False) -> Path | None:
    """spec as an existing folder or usable file, None if it does not exist at all."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf" or (allow_json and path.suffix.lower() == ".json"):
            return path
        raise SourceError(f"{path} is a file, not a model folder or a .gguf file")
    if path.suffix.lower() == ".gguf":
        raise SourceError(f"GGUF file {path} does not exist")
    return None


def _repo_id(spec: str) -> tuple[str, str | None]:
    parsed = parse_repo_spec(spec)
    if parsed is None:
        raise SourceError(
            f"SRC {spec} does not exist: give a model folder, a .gguf file or a Hugging Face "
            "repo id"
        )
    return parsed


def _with_revision(spec: str, revision: str) -> str:
    if "@" in spec and not spec.endswith(f"@{revision}"):
        raise SourceError(f"{spec} names its revision already: not also {revision}")
    return spec if "@" in spec else f"{spec}@{revision}"


def _label(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}@{revision}" if revision else repo_id


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as err:
        mapped = _hub_error(repo_id, revision, err)
        if mapped is None:
            raise
        raise mapped from err


def _offline_hint(label: str, partly: bool = False) -> SourceError:
    where = "only partly in" if partly else "not in"
    return SourceError(
        f"{label} is {where} the local Hugging Face cache and HF_HUB_OFFLINE is set: "
        "download it on a machine with network first, or unset HF_HUB_OFFLINE"
    )


def _hub_error(repo_id: str, revision: str | None, err: Exception) -> SourceError | None:
    """The SourceError for a snapshot_download failure, None for one that is a bug."""
    label = _label(repo_id, revision)
    offline = constants.HF_HUB_OFFLINE or isinstance(err.__cause__, OfflineModeIsEnabled)
    if isinstance(err, GatedRepoError):
        return SourceError(
            f"{label} is a gated Hugging Face repo: accept its terms on "
            f"https://huggingface.co/{repo_id} and log in with `hf auth login`"
        )
    if isinstance(err, RepositoryNotFoundError):
        return SourceError(
            f"{label} is neither a local path nor a Hugging Face repo you can access: "
            "check the spelling, or log in with `hf auth login` if it is private"
        )
    if isinstance(err, RevisionNotFoundError):
        return SourceError(f"{label}: the Hugging Face repo has no such revision")
    if isinstance(err, IncompleteSnapshotError) and offline:
        return _offline_hint(label, partly=True)
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        if offline:
            return _offline_hint(label)
        cause = _one_line(err.__cause__ or err)
        return SourceError(f"could not reach the Hugging Face Hub: {cause} (fetching {label})")
    if isinstance(err, HfHubHTTPError):
        return SourceError(f"the Hugging Face Hub refused {label}: {_one_line(err)}")
    if isinstance(err, _NETWORK_ERRORS):
        return SourceError(
            f"could not reach the Hugging Face Hub: {_one_line(err)} (fetching {label})"
        )
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return SourceError(
            f"no space left for {label} in the Hugging Face cache {constants.HF_HUB_CACHE}: "
            "free some space or point HF_HUB_CACHE at a larger disk"
        )
    if isinstance(err, OSError):
        return SourceError(f"could not store {label} in the Hugging Face cache: {_one_line(err)}")
    return None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _allowed(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def read_weight_map(index: Path, label: str) -> dict[str, str]:
    """The weight_map of a safetensors index, or one line naming the file and what to do."""
    try:
        weights = json.loads(index.read_text())["weight_map"]
        if isinstance(weights, dict) and all(isinstance(v, str) for v in weights.values()):
            return weights
        why = "its weight_map is not a map of tensor names to files"
    except (json.JSONDecodeError, UnicodeDecodeError):
        why = "it is not JSON"
    except (KeyError, TypeError):
        why = "it has no weight_map"
    raise SourceError(
        f"{index} is not a safetensors index ({why}): delete it and fetch {label} again; if the "
        "repo itself holds it so, give another revision or tell the repo's owners"
    )


def _check_complete(folder: Path, label: str, patterns: list[str]) -> None:
    """Fail on a snapshot that lacks files it should hold.

    Offline, snapshot_download returns a cached snapshot folder as is unless the Hub's tree
    listing was cached with it, so a snapshot left by an earlier config-only fetch would pass.
    """
    missing = []
    if _allowed("config.json", patterns) and not (folder / "config.json").is_file():
        missing.append("config.json")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_weight_map(index, label).values()))
        missing += [s for s in shards if _allowed(s, patterns) and not (folder / s).is_file()]
    elif _allowed("model.safetensors", patterns) and not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if not missing:
        return
    if constants.HF_HUB_OFFLINE:
        raise _offline_hint(label, partly=True)
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    raise SourceError(
        f"Hugging Face repo {label} has no {', '.join(missing[:3])}{more}: "
        "give a repo with config.json and safetensors weights"
    )
