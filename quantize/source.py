"""Resolve the SRC of `mlxdist quantize SRC OUT` to a local model folder or .gguf file.

SRC is a local folder, a .gguf file or a Hugging Face repo id. A repo is fetched with
`huggingface_hub.snapshot_download` into the user's own cache, so resuming, HF_HOME /
HF_HUB_CACHE and HF_HUB_OFFLINE=1 behave exactly as in every other Hugging Face tool.
"""

from __future__ import annotations

import errno
import fnmatch
import json
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
    "chat_template.jinja",
    "model.safetensors.index.json",
    "*.safetensors",
]

_NETWORK_ERRORS = (_http.TransportError, ConnectionError, TimeoutError)


class SourceError(UserError):
    """A SRC that cannot be used; the one-line message says what to do."""


def resolve_source(
    spec: str, *, allow_patterns: list[str] | None = None, revision: str | None = None
) -> Path:
    """A local model folder or .gguf file for spec, fetching a Hugging Face repo if needed."""
    local = _local(spec)
    if local is not None:
        if local.is_dir() and not (local / "config.json").is_file():
            raise SourceError(f"{local} has no config.json: is it a model folder?")
        return local
    repo_id = _repo_id(spec)
    patterns = list(allow_patterns) if allow_patterns is not None else DEFAULT_PATTERNS
    folder = _download(repo_id, revision, patterns)
    _check_complete(folder, _label(repo_id, revision), patterns)
    return folder


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
    repo_id = _repo_id(spec)
    folder = _download(repo_id, revision, ["config.json"])
    _check_complete(folder, _label(repo_id, revision), ["config.json"])
    return folder / "config.json"


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


def _repo_id(spec: str) -> str:
    # A bare name ("gpt2") is a valid repo id too, but here it is far more likely a mistyped path.
    try:
        validate_repo_id(spec)
    except HFValidationError:
        pass
    else:
        if spec.count("/") == 1:
            return spec
    raise SourceError(
        f"SRC {spec} does not exist: give a model folder, a .gguf file or a Hugging Face repo id"
    )


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
            f"SRC {label} is neither a local path nor a Hugging Face repo you can access: "
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
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
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
