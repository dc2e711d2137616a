"""The agent's request bodies: every value checked before it reaches a command line or a path."""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..hostfile import ring_hostfile
from ..rankspec import DRAFT_TOKENS, MAX_VIEW_BYTES

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # never starts with "-": not a flag
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PORT = re.compile(r"[0-9]{1,5}")
_SCOPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}")  # en0, bridge0, 4
_RDMA = re.compile(r"rdma_[a-z0-9]{1,15}")  # rdma_en2: macOS names the device after its port


def _check_ip(value: str) -> str:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    scope = getattr(ip, "scope_id", None)  # ipaddress takes any text after "%" as the scope
    if scope is not None and not _SCOPE.fullmatch(scope):
        raise ValueError(f"{value!r}: the scope must be an interface name or number")
    return str(ip)


def _check_ring_entry(entry: str) -> None:
    host, _, port = entry.rpartition(":")
    if not _PORT.fullmatch(port):
        raise ValueError(f"{entry!r} is not ip:port")
    _check_ip(host.removeprefix("[").removesuffix("]"))


def _check_rdma(rdma: list[list], size: int, ring: bool = False) -> None:
    """An N x N matrix of RDMA devices: null on the diagonal, a device (or one per cable) else;
    ring (jaccl-ring): null also allowed between ranks that are not ring neighbours."""
    if len(rdma) != size or any(len(row) != size for row in rdma):
        raise ValueError(f"rdma must be a {size} x {size} matrix, one row per rank")
    for i, row in enumerate(rdma):
        for j, cell in enumerate(row):
            if i == j:
                if cell is not None:
                    raise ValueError("rdma: a rank's device to itself must be null")
                continue
            if cell is None and ring and j not in ((i - 1) % size, (i + 1) % size):
                continue  # jaccl-ring never talks to this rank
            names = cell if isinstance(cell, list) else [cell]
            if (
                not names
                or len(names) > 16
                or not all(isinstance(n, str) and _RDMA.fullmatch(n) for n in names)
            ):
                raise ValueError(f"rdma[{i}][{j}] must name a device such as rdma_en2")


_API_HOST = r"^[A-Za-z0-9.\-]{1,253}$|^\[?[0-9a-fA-F:.]{2,45}\]?$"
_API_ORIGIN = r"^https?://([A-Za-z0-9.\-]{1,253}|\[[0-9a-fA-F:.]{2,45}\])(:[0-9]{1,5})?$"


class StartRank(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=1024)
    split: list[Annotated[int, Field(ge=1, le=1000)]] = Field(min_length=1, max_length=64)
    rank: int = Field(ge=0)
    hostfile: list[list[Annotated[str, Field(max_length=64)]]] = Field(
        default_factory=list, max_length=64
    )
    http_host: str = Field(max_length=64)
    http_port: int = Field(ge=1024, le=65535)
    name: str
    backend: Literal["ring", "jaccl", "jaccl-ring"] = "ring"
    # jaccl, jaccl-ring: rank i's RDMA device to rank j (rdma[i][j], null on the diagonal and,
    # for jaccl-ring, between ranks that are not ring neighbours) and rank 0's coordinator
    # "ip:port"; the ring backend takes the hostfile instead.
    rdma: list[list[str | list[str] | None]] | None = Field(None, max_length=64)
    coordinator: str | None = Field(None, max_length=64)
    max_context: int | None = Field(None, ge=1, le=10_000_000)
    # Rank 0 hears every rank's heartbeat on http_host:heartbeat_port; the token shows it is one.
    heartbeat_port: int | None = Field(None, ge=1024, le=65535)
    heartbeat_token: str | None = Field(None, pattern=r"^[0-9a-f]{32}$")
    node: str | None = None  # the launcher's name for this host, in failure reports
    # expert: len(split) ranks run every layer, each with its routed experts (counts per rank);
    # tensor: len(split) ranks each hold 1/N of every layer, read from the whole model
    parallel: Literal["pipeline", "expert", "tensor"] = "pipeline"
    experts: list[Annotated[int, Field(ge=1, le=100_000)]] | None = Field(None, max_length=64)
    # rank 0's API: its key (into the rank's environment, never its command line) and guards
    api_key: str | None = Field(None, pattern=r"^[\x21-\x7e]{8,256}$", repr=False)
    max_body_mb: int | None = Field(None, ge=1, le=1024)
    docs: bool = False
    allowed_hosts: list[Annotated[str, Field(pattern=_API_HOST)]] = Field([], max_length=16)
    cors_origins: list[Annotated[str, Field(pattern=_API_ORIGIN)]] = Field([], max_length=16)
    # every rank: its KV cache quantised to these bits; rank 0 only: bytes of kept prefixes
    kv_bits: Literal[4, 8] | None = None
    prompt_cache_bytes: int | None = Field(None, ge=0, le=2**50)
    # speculative decoding and the tokens drafted per step: rank 0's (prompt lookup), or every
    # rank's with "mtp" (R1's MTP layer, on the rank that holds the head)
    speculative: Literal["none", "ngram", "mtp"] = "none"
    draft_tokens: int = Field(DRAFT_TOKENS, ge=1, le=16)
    # rank 0: the launcher's view of the cluster for the dashboard, JSON text of an object
    view: str | None = Field(None, max_length=MAX_VIEW_BYTES)

    @field_validator("http_host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _check_ip(value)

    @field_validator("name", "node")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not _NAME.fullmatch(value):
            raise ValueError("name must be 1-64 letters, digits, '.', '_' or '-', not starting '-'")
        return value

    @field_validator("view")
    @classmethod
    def _view(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if len(value.encode()) > MAX_VIEW_BYTES:
            raise ValueError(f"view must be at most {MAX_VIEW_BYTES} bytes")
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):  # 64 KiB of "[[[[": too deep for the parser
            raise ValueError("view must be JSON text of at most a few levels") from None
        if not isinstance(parsed, dict):
            raise ValueError("view must be a JSON object")
        return value

    @model_validator(mode="after")
    def _ranks(self) -> StartRank:
        size = len(self.split)
        if self.experts is not None and (self.parallel != "expert" or len(self.experts) != size):
            raise ValueError("experts gives one count per rank, in expert mode only")
        if self.rank >= size:
            raise ValueError(f"rank {self.rank} is not below the {size} ranks of the split")
        if self.prompt_cache_bytes is not None and self.rank != 0:
            raise ValueError("prompt_cache_bytes is rank 0's: it tells the other ranks")
        if self.view is not None and self.rank != 0:
            raise ValueError("view is rank 0's: it serves the dashboard")
        ngram = self.speculative == "ngram" or (
            self.speculative == "none" and self.draft_tokens != DRAFT_TOKENS
        )
        if self.rank != 0 and ngram:
            raise ValueError("prompt lookup's settings are rank 0's: it drafts the tokens")
        if self.backend in ("jaccl", "jaccl-ring"):
            return self._jaccl(size)
        if self.rdma is not None or self.coordinator is not None:
            raise ValueError("rdma and coordinator are for the jaccl and jaccl-ring backends")
        if size > 1 and len(self.hostfile) != size:
            raise ValueError(f"hostfile needs one entry per rank ({size})")
        if size == 1 and len(self.hostfile) > 1:
            raise ValueError("a single rank takes no hostfile")
        if self.hostfile:
            for entries in self.hostfile:
                if len(entries) > 16:
                    raise ValueError("at most 16 addresses per rank")
                for entry in entries:
                    _check_ring_entry(entry)
            ring_hostfile(self.hostfile)
        return self

    def _jaccl(self, size: int) -> StartRank:
        if self.hostfile:
            raise ValueError(f"{self.backend} takes rdma and coordinator, not a ring hostfile")
        if size == 1:
            if self.rdma is not None or self.coordinator is not None:
                raise ValueError("a single rank takes no rdma or coordinator")
            return self
        if self.rdma is None or self.coordinator is None:
            raise ValueError(
                f"{self.backend} needs rdma (a device matrix) and coordinator (ip:port)"
            )
        _check_rdma(self.rdma, size, ring=self.backend == "jaccl-ring")
        _check_ring_entry(self.coordinator)
        if not 0 < int(self.coordinator.rpartition(":")[2]) < 65536:
            raise ValueError(f"coordinator {self.coordinator!r} has no valid port")
        return self


class CompleteFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    path: str = Field(min_length=1, max_length=1024)
    size: int = Field(ge=0)
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str) -> str:
        value = value.lower()
        if not _SHA256.fullmatch(value):
            raise ValueError("sha256 must be 64 hex digits")
        return value


_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# a branch, tag or commit hash; '/' as in refs/pr/1 (a path under refs/: no empty or dot part)
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")
_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")  # a file at the top of the repo
_TOKEN = re.compile(r"[\x21-\x7e]{1,512}")  # printable, no spaces: never a header injection


def _check_repo(value: str) -> str:
    if not _REPO.fullmatch(value) or ".." in value:
        raise ValueError("repo must be org/name")
    return value


def _check_revision(value: str | None) -> str | None:
    if value is not None and (not _REVISION.fullmatch(value) or ".." in value):
        raise ValueError("revision must be a branch, tag or commit hash")
    return value


def _check_token(value: str | None) -> str | None:
    if value is not None and not _TOKEN.fullmatch(value):
        raise ValueError("token must be printable characters without spaces")
    return value


class ProbeHub(BaseModel):
    """Can the agent reach the Hub and see repo? token: as in FetchFiles."""

    model_config = ConfigDict(extra="forbid", strict=True)

    repo: str = Field(max_length=200)
    revision: str | None = Field(None, max_length=128)
    token: str | None = Field(None, max_length=512, repr=False)

    @field_validator("repo")
    @classmethod
    def _repo(cls, value: str) -> str:
        return _check_repo(value)

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        return _check_revision(value)

    @field_validator("token")
    @classmethod
    def _token(cls, value: str | None) -> str | None:
        return _check_token(value)


class FetchFiles(ProbeHub):
    """Fetch these files of a Hugging Face repo into the agent's own cache; token, when given,
    is the launcher's HF_TOKEN (it never appears in an answer or a log)."""

    files: list[Annotated[str, Field(max_length=255)]] = Field(min_length=1, max_length=10_000)
    verify: bool = False  # hash again the files already in the cache

    @field_validator("files")
    @classmethod
    def _files(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _FILE.fullmatch(name) or name.endswith(".incomplete"):
                raise ValueError(f"{name[:80]!r} is not a file name at the top of a repo")
        if len(set(value)) != len(value):
            raise ValueError("files must not repeat")
        return value
